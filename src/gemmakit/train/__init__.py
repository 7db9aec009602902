"""Training: data to token files, pretraining and supervised fine-tuning (full or LoRA), on one
CPU or many processes under torchrun. `train(TrainConfig(...))` is the way in; see docs/training.md."""

from .loop import Result, TrainConfig, train

__all__ = ["TrainConfig", "Result", "train"]
