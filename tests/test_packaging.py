"""The wheel ships kernels/ and benchmarks/ inside olmo2_fast, never as top-level packages
(both names are taken on PyPI; transformers imports any top-level `kernels`), and the demo models."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_only_the_olmo2_fast_namespace(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"pip wheel failed:\n{proc.stderr[-2000:]}")
    wheel = next(tmp_path.glob("olmo2_fast-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top_level == {"olmo2_fast"}
    assert "olmo2_fast/kernels/__init__.py" in names and "olmo2_fast/benchmarks/__init__.py" in names
    for model in ("target", "draft"):  # the trained demo pair is package data: the CLI's default model
        assert all(f"olmo2_fast/demo_models/{model}/{f}" in names for f in (
            "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"))
    assert "olmo2_fast/demo_models/heldout.txt" in names and "olmo2_fast/demo_models/training.json" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "olmo2-fast = olmo2_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
