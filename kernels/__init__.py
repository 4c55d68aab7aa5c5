"""Triton kernels for OLMo 2, installed as `olmo2_fast.kernels`.

Each module holds one kernel family: the @triton.jit kernel(s), one validating launcher
(also registered as a torch.ops.olmo2_fast custom op), a plain-PyTorch `*_reference`, and
a `*_cost` roofline. Importing this package imports triton: on a CPU, set
TRITON_INTERPRET=1 first to run the kernels under Triton's interpreter.
"""
from .attention import attention_decode, attention_prefill, attention_reference
from .int4_format import Int4Weight, dequantize_int4, quantize_int4
from .int4_matmul import int4_matmul, int4_matmul_reference
from .qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from .rmsnorm import residual_rmsnorm, residual_rmsnorm_reference, rmsnorm, rmsnorm_reference
from .roofline import Cost
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "attention_prefill", "attention_decode", "attention_reference",
    "Int4Weight", "quantize_int4", "dequantize_int4", "int4_matmul", "int4_matmul_reference",
    "qk_norm_rope", "qk_norm_rope_reference",
    "rmsnorm", "residual_rmsnorm", "rmsnorm_reference", "residual_rmsnorm_reference",
    "swiglu", "swiglu_reference", "Cost",
]
