import importlib.util
import json
from pathlib import Path

import pytest

from gemmakit import bench, kernels
from gemmakit.cli.main import main


def test_bench_prompt_is_fixed_and_has_no_special_tokens():
    ids = bench.bench_prompt(8192, 300)
    assert ids == bench.bench_prompt(8192, 300) and len(ids) == 301 and ids[0] == 2
    assert all(1000 <= i < 8192 for i in ids[1:])


@pytest.mark.parametrize("extra", [[], ["--quantize", "int8"]])
def test_bench_command_reports_every_figure(capsys, extra):
    code = main(["bench", "--model", "gemma-tiny", "--threads", "1", "--prefill-tokens", "16",
                 "--decode-tokens", "2", "--batch-sizes", "1,3", "--json", *extra])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in ("prefill_tok_s", "decode_b1_tok_s", "decode_b3_tok_s", "load_s", "peak_rss_mb", "weights_mb", "kv_mb"):
        assert result[key] > 0, key
    assert result["rss_ratio"] == result["peak_rss_mb"] / (result["weights_mb"] + result["kv_mb"])
    assert result["dtype"] == "float32"  # int8 runs float32 activations too
    assert result["quantize"] == (extra[1] if extra else None)
    assert ("int8_kernel" in result) == bool(extra)  # which loops this machine runs int8 on
    if extra:
        assert result["int8_kernel"] == kernels.describe()


def test_bench_rejects_a_non_positive_count(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "gemma-tiny", "--decode-tokens", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_gpu_roofline_script_measures_decode_against_the_bandwidth_roof(capsys):
    """benchmarks/gpu_roofline.py (run on a GPU when a session gets one) works end to end on the CPU."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_roofline.py"
    spec = importlib.util.spec_from_file_location("gpu_roofline", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    result = script.main(["--device", "cpu", "--preset", "gemma-tiny", "--dtype", "float32", "--prefill-tokens", "16",
                          "--decode-tokens", "2", "--copy-mb", "16"])
    assert result["bandwidth_gb_s"] > 0 and result["decode_b1_tok_s"] > 0
    assert result["roof_tok_s"] == pytest.approx(result["bandwidth_gb_s"] / result["weights_gb"])
    assert result["share_of_roof"] == pytest.approx(result["decode_b1_tok_s"] / result["roof_tok_s"])
    assert "share of roof" in capsys.readouterr().out
