"""olmo2_fast: a custom-kernel inference runtime for AllenAI's OLMo 2 models.

The public names load on first use (PEP 562), so `import olmo2_fast.cli` — and with it
`olmo2-fast --help` — imports neither torch nor triton; the kernels load with the backend
that uses them.
"""
import importlib

__version__ = "0.2.0"

_PUBLIC = {
    "OLMo2": "api", "Olmo2Config": "config", "PRESETS": "config", "preset": "config",
    "SamplingParams": "sampling", "Olmo2Error": "errors", "ConfigError": "errors", "CheckpointError": "errors",
    "TokenizerError": "errors", "GenerationError": "errors", "EvaluationError": "errors",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'olmo2_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
