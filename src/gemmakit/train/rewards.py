"""Rewards for online RL: one callable interface, `fn(prompts=..., completions=..., **fields)` ->
a number per completion, as trl's reward functions are called (so theirs work here).

    reward = load("my_rewards:exact_answer")     # a function in an importable module or a .py file
    reward = from_reward_model("rm/")            # a trained reward model (gemmakit.train.reward)
    scores = reward(prompts, completions, {"answer": [...]})   # list[float], checked

`fields` are the prompt file's other JSONL fields (an `answer` to check against, say), one value
per completion. A function that raises or returns anything but one finite number per completion
is a RewardError naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import ConfigError, RewardError


@dataclass(frozen=True)
class Reward:
    name: str  # what errors call it: "module:function", "reward model DIR"
    fn: Callable[..., Sequence[float]]

    def __call__(self, prompts: list[str], completions: list[str], fields: dict[str, list] | None = None) -> list[float]:
        try:
            values = self.fn(prompts=prompts, completions=completions, **(fields or {}))
        except Exception as e:  # the user's code: any error, named as theirs
            detail = str(e).splitlines()[0] if str(e) else ""
            raise RewardError(f"reward {self.name} raised {type(e).__name__}{': ' + detail if detail else ''}") from None
        if hasattr(values, "tolist"):  # a tensor or an array
            values = values.tolist()
        if not isinstance(values, Sequence) or isinstance(values, (str, bytes)):
            raise RewardError(f"reward {self.name} returned {type(values).__name__}, not a list of numbers "
                              f"(one per completion)")
        if len(values) != len(completions):
            raise RewardError(f"reward {self.name} returned {len(values)} values for {len(completions)} completions")
        for i, v in enumerate(values):
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise RewardError(f"reward {self.name} returned {v!r} for completion {i}: not a finite number")
        return [float(v) for v in values]


def load(spec: str) -> Reward:
    """`module:function`: module is importable (dotted) or a path to a .py file."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function:
        raise ConfigError(f"reward {spec!r}: expected module:function (a module or a .py file, then a function)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"reward {spec}: no such file {path}")
            loader = importlib.util.spec_from_file_location(f"gemmakit_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if "" not in sys.path and "." not in sys.path:  # the current folder's modules, as `python -m` finds them
                sys.path.insert(0, "")
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as e:  # ImportError, or whatever the module's own code raises on import
        raise ConfigError(f"reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    fn = getattr(module, function, None)
    if fn is None:
        raise ConfigError(f"reward {spec}: {module_name} has no {function}")
    if not callable(fn):
        raise ConfigError(f"reward {spec}: {function} is a {type(fn).__name__}, not a function")
    return Reward(spec, fn)


def from_reward_model(path: str) -> Reward:
    """A trained reward model's score (`gemmakit reward`'s output folder) as a reward."""
    try:
        from .reward import RewardModel
    except ImportError:
        raise ConfigError("reward models need gemmakit.train.reward, which this install lacks") from None
    model = RewardModel.load(path)

    def score(prompts, completions, **fields):
        return model.score(prompts, completions)

    return Reward(f"model {path}", score)
