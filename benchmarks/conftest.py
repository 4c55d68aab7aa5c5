"""pytest setup for the micro-benchmarks (`python -m pytest benchmarks --benchmark-only`).

Without CUDA the kernels run under Triton's interpreter, which must be switched on before triton
is first imported; `python -m pytest tests` never collects this folder.
"""
import torch

from olmo2_fast.engine import enable_triton_interpreter

if not torch.cuda.is_available():
    enable_triton_interpreter()
