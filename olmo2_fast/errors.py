"""Errors a user can act on. Each is a ValueError so callers may catch either."""


class Olmo2Error(ValueError):
    """Base class of olmo2_fast's user-facing errors."""


class ConfigError(Olmo2Error):
    """config.json is missing, malformed, or not an OLMo 2 configuration."""


class CheckpointError(Olmo2Error):
    """Weights are missing, unexpected, mis-shaped or of an unsupported dtype."""


class TokenizerError(Olmo2Error):
    """tokenizer.json or tokenizer_config.json is missing or malformed."""


class GenerationError(Olmo2Error):
    """A generation request cannot be served (prompt too long, bad arguments, cache too small)."""


class EvaluationError(Olmo2Error):
    """An evaluation cannot run as asked (text too short, bad window sizes, incomparable models)."""
