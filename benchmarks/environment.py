"""Where a benchmark ran: the device, the versions, the date, and whether it is a smoke run.

Every saved row carries these fields, so a number can never be read without its card and
versions. `mode` is "gpu" (real shapes on a CUDA GPU), "gpu-smoke" (tiny shapes on a GPU,
`--smoke`) or "cpu-smoke" (no CUDA: tiny shapes, kernels under Triton's interpreter).
CPU smoke timings exercise the code paths; they are not GPU figures and never stand in for one.

torch is imported only by `detect`: gpu_check prints the versions and the host with
`package_version` and `host_name` before the project (or anything heavy) is imported.
"""
from __future__ import annotations

import datetime
import importlib.metadata
import os
from dataclasses import asdict, dataclass


def package_version(package: str) -> str | None:
    """The installed version, read from package metadata (importing triton here would fix the
    interpreter decision too early; importing transformers is slow)."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def host_name() -> str:
    """The CPU model and its core count."""
    return f"{_cpu_name()} x{os.cpu_count()}"


@dataclass(frozen=True)
class Environment:
    mode: str                 # "gpu", "gpu-smoke" or "cpu-smoke"
    gpu: str                  # the CUDA device name, or "none"
    device: str               # "cuda:0" or "cpu"
    host: str                 # the CPU model and its core count
    torch: str
    triton: str | None
    transformers: str | None
    date: str                 # UTC, ISO 8601

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def smoke(self) -> bool:
        return self.mode != "gpu"

    def fields(self) -> dict:
        """The columns every row carries."""
        return asdict(self)

    def banner(self) -> str:
        if self.mode == "cpu-smoke":
            return (f"CPU SMOKE RUN on {self.host}: no CUDA GPU. Tiny shapes, kernels under Triton's interpreter; "
                    "these timings check the code paths and are NOT GPU figures.")
        kind = "GPU SMOKE RUN (tiny shapes)" if self.smoke else "GPU"
        return f"{kind}: {self.gpu}, torch {self.torch}, triton {self.triton}, {self.date}"


def detect(smoke: bool) -> Environment:
    """The environment of this process; without CUDA the run is always a CPU smoke run."""
    import torch

    on_gpu = torch.cuda.is_available()
    mode = ("gpu-smoke" if smoke else "gpu") if on_gpu else "cpu-smoke"
    return Environment(
        mode=mode,
        gpu=torch.cuda.get_device_name() if on_gpu else "none",
        device=f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu",
        host=host_name(),
        torch=torch.__version__,
        triton=package_version("triton"),
        transformers=package_version("transformers"),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
