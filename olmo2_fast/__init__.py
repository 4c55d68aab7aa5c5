"""olmo2_fast: a custom-kernel inference runtime for AllenAI's OLMo 2 models.

Importing the package does not import triton; the kernels load with the backend that uses them.
"""
from .api import OLMo2
from .config import PRESETS, Olmo2Config, preset
from .errors import CheckpointError, ConfigError, GenerationError, Olmo2Error, TokenizerError
from .sampling import SamplingParams

__all__ = ["OLMo2", "Olmo2Config", "PRESETS", "preset", "SamplingParams", "Olmo2Error", "ConfigError",
           "CheckpointError", "TokenizerError", "GenerationError"]
