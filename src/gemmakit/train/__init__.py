"""Training: data to token files, pretraining and supervised fine-tuning (full or LoRA), on one
CPU or many processes under torchrun. `train(TrainConfig(...))` is the way in; see docs/training.md.

The loop is imported on first use: it pulls in torch.distributed, which would slow every
`gemmakit` command's start (the CLI imports `gemmakit.train.cli`, and so this package).
"""

__all__ = ["TrainConfig", "Result", "train"]


def __getattr__(name: str):
    if name in __all__:
        from . import loop

        return getattr(loop, name)
    raise AttributeError(name)
