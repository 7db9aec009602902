"""gemmakit.train.cli: `gemmakit train` / `finetune` from flags or a TOML file; errors in one line."""

import gemmakit
from gemmakit.cli.main import main


def test_train_from_a_toml_config_with_flag_overrides(tmp_path, tiny_config_file, corpus, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(f'model = "{tiny_config_file}"\ndata = ["{corpus}"]\nout = "{tmp_path / "out"}"\n'
                    'seq-len = 32\nbatch_size = 4\nmax_steps = 50\nlr = 0.003\nprogress = false\n')
    assert main(["train", "--config", str(toml), "--max-steps", "3", "--eval-every", "3"]) == 0
    assert "3 steps" in capsys.readouterr().out
    lm = gemmakit.load(tmp_path / "out", progress=False)
    assert lm.config.d_model == 64 and lm.tokenizer is not None


def test_bad_input_is_one_line(tmp_path, tiny_config_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    rc = main(["train", "--model", str(tiny_config_file), "--data", str(empty), "--out", str(tmp_path / "o"),
               "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err and err.startswith("gemmakit: error:") and "empty" in err
    rc = main(["finetune", "--model", str(tiny_config_file), "--data", str(empty), "--out", str(tmp_path / "p"),
               "--seq-len", "32"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "has no tokenizer" in err
    rc = main(["train", "--config", str(tmp_path / "missing.toml")])
    assert rc == 1 and "missing.toml: no such config file" in capsys.readouterr().err
