"""Record what a piece of code would launch on the device, without running a kernel.

Under Triton's interpreter every launch goes through
`triton.runtime.interpreter.GridExecutor.__call__`. `record_launches()` replaces it with a
recorder that computes the launch's grid (calling the grid function on the bound arguments,
as the real executor does) and returns at once, and enters a TorchDispatchMode that lists
torch's own device work (views, metadata and allocations skipped: they launch nothing). Code
that never reads a device value on the host (a decode step) then runs end to end at real
widths in seconds: tensors may be `torch.empty` at full size (never touched, so never paged
in), and outputs keep whatever they held. Kernels registered as `olmo2_fast` custom ops are
seen as their Triton launches, not as torch ops.

    with record_launches() as plan:
        model.forward(batch, cache, decode=True)
    assert all(launch.programs >= 132 for launch in plan.launches)

Only for the interpreter (TRITON_INTERPRET=1, set by conftest.py without a GPU).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that launch no device work: allocation and metadata. Views are recognised by schema.
_NO_LAUNCH = {
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::detach", "aten::alias", "aten::lift_fresh", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
    "aten::sym_storage_offset", "aten::is_same_size", "aten::_has_compatible_shallow_copy_type",
}
_HOST_SYNC = {"aten::_local_scalar_dense"}  # .item(), .tolist(), bool(tensor): the host waits for the device


@dataclass(frozen=True)
class Launch:
    kernel: str                     # the @triton.jit function's name
    grid: tuple[int, int, int]
    constexprs: dict = field(compare=False)

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclass
class LaunchPlan:
    launches: list[Launch] = field(default_factory=list)  # Triton launches, in order
    torch_ops: list[str] = field(default_factory=list)    # torch ops that launch device work, in order
    host_syncs: list[str] = field(default_factory=list)   # ops that make the host wait for the device

    @property
    def device_launches(self) -> int:
        return len(self.launches) + len(self.torch_ops)

    def of(self, kernel: str) -> list[Launch]:
        return [launch for launch in self.launches if launch.kernel == kernel]


class _TorchOps(TorchDispatchMode):
    def __init__(self, plan: LaunchPlan):
        super().__init__()
        self.plan = plan

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _HOST_SYNC:
            self.plan.host_syncs.append(name)
        elif not (func.is_view or name in _NO_LAUNCH or name.startswith("olmo2_fast::")):
            self.plan.torch_ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def record_launches() -> Iterator[LaunchPlan]:
    """Within the block, Triton launches are recorded (grid and constexprs) and not executed,
    and torch's device ops are listed; yields the LaunchPlan being filled."""
    from triton.runtime import interpreter

    if not hasattr(interpreter, "GridExecutor"):
        raise RuntimeError("record_launches needs triton's interpreter (TRITON_INTERPRET=1)")
    plan = LaunchPlan()
    executor = interpreter.GridExecutor
    run = executor.__call__

    def record(self, *args, **kwargs):
        # As GridExecutor.__call__: drop launch options (num_warps, launch_pdl, ...), bind, grid.
        names = inspect.getfullargspec(self.fn).args
        bound = inspect.getcallargs(self.fn, *args, **{k: v for k, v in kwargs.items() if k in names})
        grid = tuple(self.grid(bound) if callable(self.grid) else self.grid)
        plan.launches.append(Launch(self.fn.__name__, grid + (1,) * (3 - len(grid)),
                                    {name: bound[name] for name in self.constexprs}))

    executor.__call__ = record
    try:
        with _TorchOps(plan):
            yield plan
    finally:
        executor.__call__ = run
