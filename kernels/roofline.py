"""Roofline arithmetic shared by every kernel module.

A kernel's floor is max(bytes / bandwidth, flops / peak): each kernel module exposes a
`*_cost(...)` function returning the bytes it must move and the FLOPs it must do for a
shape, and the benchmark divides measured time by that floor.
"""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Cost:
    bytes: int  # minimum HBM traffic: every input read once, every output written once
    flops: int  # floating-point operations (a multiply-add counts 2)

    def floor_seconds(self, bandwidth_bytes_per_s: float, peak_flops_per_s: float) -> float:
        return max(self.bytes / bandwidth_bytes_per_s, self.flops / peak_flops_per_s)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.bytes + other.bytes, self.flops + other.flops)


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
