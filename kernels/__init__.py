"""Triton kernels for OLMo 2, installed as `olmo2_fast.kernels`.

One module per kernel family; each holds the @triton.jit kernel(s), one validating
launcher (also a torch.ops.olmo2_fast custom op), a plain-PyTorch `*_reference` and a
`*_cost` roofline:

  qk_norm_rope  qk_norm_rope                      q/k RMSNorm over all heads + RoPE + KV-cache write
  attention     attention_prefill, attention_decode   causal flash attention, split-KV decode
  fused_attention_decode  fused_attention_decode  decode from the raw qkv row: QK-norm, RoPE, cache write,
                                                  split-KV attention and the combine in one launch
  decode_gemv   decode_gemv, decode_gemv_*          decode GEMV (M <= 16) with fused prologues and split-K
  rmsnorm       rmsnorm, residual_rmsnorm         final norm; OLMo 2's post-norm + residual
  swiglu        swiglu                            silu(gate) * up
  int4_format   quantize_int4, dequantize_int4, Int4Weight   the int4 group-128 format (PyTorch)
  int4_matmul   int4_matmul                       int4 weight-only GEMV / GEMM
  roofline      Cost                              bytes / FLOPs of a kernel call
  pdl           pdl_enabled, wait_for_producer    programmatic dependent launch, off under the interpreter

The package imports nothing itself, so the launcher names do not shadow their modules
and `roofline` loads without triton. Importing a kernel module imports triton: on a CPU,
set TRITON_INTERPRET=1 first to run the kernels under Triton's interpreter.
"""
__all__ = ["attention", "decode_gemv", "fused_attention_decode", "int4_format", "int4_matmul", "pdl", "qk_norm_rope",
           "rmsnorm", "roofline", "swiglu"]
