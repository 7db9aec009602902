"""The long fuzz run of gemmakit's readers (the suite runs a few hundred of the same cases).

    python scripts/fuzz_readers.py --cases 10000 [--start 0] [--timeout 20] [--findings findings.jsonl]

Prints a table of outcomes per seed file kind and writes every finding (case number, mutation,
detail) to --findings; a case is reproduced by its number: `--start N --cases 1`.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "checkpoints"))
import fuzzing  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take before it is a hang")
    parser.add_argument("--findings", type=Path, default=Path("fuzz-findings.jsonl"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = fuzzing.make_seeds(work / "seeds", fuzzing.sentencepiece_model(work / "spm"))
        with tqdm(total=args.cases, desc="fuzzing", unit="case") as bar:
            outcomes = fuzzing.fuzz(seeds, work, range(args.start, args.start + args.cases), args.timeout,
                                    progress=bar)
    findings = [o for o in outcomes if o.result in fuzzing.FINDINGS]
    with open(args.findings, "w") as f:
        for o in findings:
            f.write(json.dumps(dataclasses.asdict(o)) + "\n")
    print(fuzzing.table(outcomes))
    print(f"{len(findings)} findings written to {args.findings}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
