"""olmo2_fast: a custom-kernel inference runtime for AllenAI's OLMo 2.

The repository keeps `kernels/` and `benchmarks/` at the top level for readers, but
installs them as `olmo2_fast.kernels` and `olmo2_fast.benchmarks`: both bare names are
taken on PyPI (transformers imports any top-level `kernels` it can find).
"""
import re
from pathlib import Path

from setuptools import setup

VERSION = re.search(r'^__version__ = "(.+)"', (Path(__file__).parent / "olmo2_fast" / "__init__.py").read_text(), re.M)[1]

setup(
    name="olmo2_fast",
    version=VERSION,
    description="Low-latency OLMo 2 inference with Triton kernels",
    python_requires=">=3.10",
    packages=["olmo2_fast", "olmo2_fast.kernels", "olmo2_fast.benchmarks"],
    package_dir={
        "olmo2_fast": "olmo2_fast",
        "olmo2_fast.kernels": "kernels",
        "olmo2_fast.benchmarks": "benchmarks",
    },
    install_requires=[
        "torch>=2.4",
        "triton>=3.2",
        "numpy<2.3",  # triton 3.6's interpreter breaks on numpy >= 2.3
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "jinja2>=3",  # chat templates
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4"],
        "hub": ["huggingface_hub"],
        "parity": ["transformers==5.24.0"],  # tests/test_hf_parity.py and the bench's HF baseline
        "eval": ["lm-eval==0.4.13", "accelerate==1.15.0"],  # the lm-eval adapter; lm-eval's hf model needs accelerate
        # the server, its clients in tests: openai, httpx, and tenacity for lm-eval's local-completions model
        "serve": ["fastapi>=0.110", "uvicorn>=0.30", "openai>=1.40", "httpx>=0.27", "tenacity"],
    },
    # The trained demo pair (olmo2_fast/demo_train.py) ships inside the package: `olmo2-fast` runs it by default.
    package_data={"olmo2_fast": ["demo_models/*.txt", "demo_models/*.json", "demo_models/*/*.json",
                                 "demo_models/*/*.safetensors"]},
    entry_points={"console_scripts": ["olmo2-fast=olmo2_fast.cli:main",
                                      "olmo2-lm-eval=olmo2_fast.lm_eval_adapter:main"]},
)
