"""`torchrun --nproc-per-node N -m gemmakit.eval ARGS`: `gemmakit eval ARGS`, the items split over
N processes (and over machines with --nnodes); rank 0 writes the one results file."""

import sys

from ..cli.main import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
