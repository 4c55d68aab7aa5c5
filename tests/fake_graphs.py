"""A stand-in for CUDA graphs on a CPU, behind graphs.GraphRecorder's interface.

`FakeGraphRecorder.capture(step, device)` runs the step once (as the real recorder's
warm-up does) and keeps its output tensor; `replay()` runs the step again on the same
static buffers and copies the result into that tensor. Callers therefore see what a
replayed CUDA graph gives them, and everything around the capture (bucket choice, the
static buffers and how they are filled, recapture on a new cache) is the production code.

What a real capture refuses, the fake refuses too, on every run of the step:
  * a host read of a tensor value (`.item()`, `bool(t)`, `int(t)`, `.tolist()`): a real graph
    would freeze the value read at capture time;
  * a launch through Triton's autotuner: it benchmarks and synchronises, which breaks a capture.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from triton.runtime.autotuner import Autotuner
from torch.utils._python_dispatch import TorchDispatchMode

from olmo2_fast.graphs import CapturedStep


class CaptureViolation(AssertionError):
    """The captured step did something a CUDA-graph capture cannot contain."""


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise CaptureViolation("the captured step reads a tensor value on the host (.item(), bool(), int())")
        return func(*args, **(kwargs or {}))


def _refuse(what):
    def refuse(*args, **kwargs):
        raise CaptureViolation(f"the captured step {what}")
    return refuse


@contextlib.contextmanager
def capture_rules():
    """Run the body as if it were being captured: host reads and autotuned launches raise CaptureViolation."""
    with mock.patch.object(Autotuner, "run", _refuse("launches an autotuned kernel")), \
            mock.patch.object(torch.Tensor, "tolist", _refuse("reads a tensor on the host (.tolist())")), \
            _NoHostReads():
        yield


class FakeGraphRecorder:
    """Records steps by running them; `captures` counts captures per device, for tests."""

    def __init__(self):
        self.captures: list[torch.device] = []

    def capture(self, step, device: torch.device) -> CapturedStep:
        with capture_rules():
            output = step()
        self.captures.append(device)

        def replay():
            with capture_rules():
                output.copy_(step())
        return CapturedStep(output, replay)
