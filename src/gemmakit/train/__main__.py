"""`torchrun --nproc_per_node N -m gemmakit.train [train|finetune|rl] ARGS`: the same arguments as
`gemmakit train` / `gemmakit finetune` / `gemmakit rl`, one process per device."""

import sys

from ..cli.main import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("train", "finetune", "rl"):
        argv = ["train", *argv]
    sys.exit(main(argv))
