"""The exception types users see. The CLI prints any of them as one line and exits non-zero."""


class GemmaError(Exception):
    """Base of every error gemmakit raises for a user's mistake or a bad file."""


class ConfigError(GemmaError, ValueError):
    """A config or preset that does not describe a valid Gemma model."""


class CheckpointError(GemmaError):
    """A weights file that is missing, unreadable, truncated, or does not match its config."""


class TokenizerError(GemmaError):
    """A tokenizer that is missing, unreadable, or does not fit the model."""


class GenerationError(GemmaError, ValueError):
    """A request the generation engine cannot serve (prompt too long, bad sampling values)."""


class DataError(GemmaError, ValueError):
    """Training data that is missing, empty, unreadable, or too short to fill one sequence."""


class RewardError(GemmaError):
    """A reward function for RL that raised, or returned something other than a number per completion."""
