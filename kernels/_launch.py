# What every kernel launcher needs around its launches: the tensors' device made current.
#
# Triton launches on the *current* CUDA device and its current stream
# (`driver.active.get_current_device()` in JITFunction.run), not on the device of the
# tensors it is given. A model on cuda:1 while the current device is 0 would launch its
# kernels in device 0's context with device 1's pointers. torch's own ops carry a device
# guard; ours get the same one here (as flash-attention's rotary launcher does with
# `torch.cuda.device(x.device.index)`). On a CPU (Triton's interpreter) it is a no-op.
import contextlib

import torch


def launch_device(device: torch.device):
    """Context under which a launcher's kernels run: `torch.cuda.device(device)` for a CUDA
    device, nothing otherwise. Entering it is a host-side context switch, no synchronisation."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
