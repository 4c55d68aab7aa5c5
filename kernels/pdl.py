# Programmatic dependent launch (PDL) for the decode step's kernels (sm_90+).
#
# A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it on the
# stream is still draining its last wave. Its prologue (index math, loads of weights, which no
# predecessor writes) then overlaps the predecessor's tail. Two rules make that safe:
#   * `wait_for_producer(USE_PDL)` before the first load of anything a predecessor wrote
#     (activations, the KV cache, counters): griddepcontrol.wait blocks until every
#     predecessor's memory operations are visible;
#   * `release_dependents(USE_PDL)` once the kernel no longer needs its dependents held back
#     (griddepcontrol.launch_dependents); a dependent still waits for this kernel's writes.
# Both are inline PTX, which Triton's interpreter cannot run: kernels take a `USE_PDL: tl.constexpr`
# that the launcher sets from `pdl_enabled(device)`, off under the interpreter and below sm_90, so a
# pure-Triton path always exists. griddepcontrol is a no-op when the launch did not ask for PDL.
# Launchers pass `launch_pdl=` with the other launch options through
# `torch.library.wrap_triton(kernel)[grid](...)`: eagerly (what a CUDA-graph capture records) it
# calls `kernel[grid](*args, **kwargs)` unchanged, and in a traced graph the option rides along
# as a constant argument to the same call (torch/_higher_order_ops/triton_kernel_wrap.py); Triton
# makes it the CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION launch attribute.
# Transitivity: a kernel's wait covers its predecessor's completion only, so *every* program of
# every kernel in a PDL chain must reach wait_for_producer before it exits.
import functools
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are compiled with griddepcontrol and launched with launch_pdl=True."""
    device = torch.device(device)
    return (not INTERPRETED and device.type == "cuda"
            and torch.cuda.get_device_capability(device)[0] >= 9)


@triton.jit
def wait_for_producer(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
