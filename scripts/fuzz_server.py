"""The long run of the server's fuzz test: schemathesis over every route with many examples.

    python scripts/fuzz_server.py                      # 300 examples a route, seed 0
    python scripts/fuzz_server.py --examples 2000 --seed 7

It runs tests/serve/test_serve_fuzz.py (the suite's bounded run uses 12 examples a route and a
fixed derandomized seed) with more examples and the seed given; a failure prints the body that
caused it. The hostile-client cases of the same file run too.
"""

import argparse
import os
import sys
from pathlib import Path

import pytest


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=300, help="generated requests per route (besides schemathesis' "
                                                               "coverage cases)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ["GEMMAKIT_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ["GEMMAKIT_FUZZ_SEED"] = str(args.seed)
    test = Path(__file__).resolve().parents[1] / "tests" / "serve" / "test_serve_fuzz.py"
    return pytest.main([str(test), "-q", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(main())
