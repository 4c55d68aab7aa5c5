"""`benchmarks/gpu_check.sh OUTDIR`: prove the kernels on one H100 / H200 in at most 9 minutes.

The plan (`build_plan`, the one list of steps) installs the project without network, runs the
test suite natively (non-heavy tests + the heavy bf16 cases, gpu_test_selection), then the
benchmarks at the published 1B and 7B shapes, each step under its own wall-clock cap. A step
that fails or hits its cap is recorded and the next one runs; at the end gpu_summary writes
summary.md (each figure against targets.TARGETS), results.json and results.csv into OUTDIR
beside check.log (every step's output) and tests.xml, and the summary is printed.

Run from the checkout as `python -m benchmarks.gpu_check` (what gpu_check.sh does): the
project is installed by the first step, so this module and what it imports (targets,
gpu_summary, report, environment) use the standard library only.

`--dry-run` prints the plan and checks that every command in it parses, without running
anything heavy: argparse of each olmo2-fast command line, `pytest --collect-only` of the
test selection, `pip install --dry-run` of the install, `bash -n` of gpu_check.sh.

What comes back from the GPU machine is at most 8 files of 16 MiB, at most 2 folders deep,
named in letters, digits, '.', '_' and '-': OUTDIR holds five such files, no folders, and
`outdir_problems` checks that at the end. The bench steps' own JSON files go to a work
folder outside OUTDIR; results.json carries their rows.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .environment import host_name, package_version
from .gpu_summary import write_summary
from .targets import PROMPT_LEN

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PYTHON = sys.executable
LOG, JUNIT = "check.log", "tests.xml"

FUSED_DECODE_KERNELS = ("decode_gemv", "decode_gemv_int4", "fused_attention_decode")  # bench kernels names
TOTAL_BUDGET_S = 540       # 9 minutes of wall time on the card, the summary included
SUMMARY_RESERVE_S = 10     # kept back from the steps for the summary
MIN_STEP_S = 10            # a step with less time than this left is not started
INTERRUPT_GRACE_S = 15     # SIGINT this long before a step's cap (pytest then still writes its XML), SIGKILL at the cap
TEST_WORKERS = 8           # pytest-xdist workers when it is installed (the card has 16 cores)
PACKAGES = ("torch", "triton", "transformers", "safetensors", "tokenizers", "jinja2", "numpy", "pytest",
            "pytest-xdist")

# What the GPU machine sends back (device README): files per run, bytes per file, name characters.
MAX_FILES, MAX_FILE_BYTES, MAX_DEPTH = 8, 16 * 2**20, 2
SAFE_NAME = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]      # `python -m MODULE ...`, run from the repository root
    cap_s: int                 # wall-clock limit
    sizing: str                # how the cap was sized
    result: str | None = None  # the file the step writes (bench JSON, junit XML)

    @property
    def module(self) -> str:
        return self.argv[2] if self.argv[1:2] == ("-m",) else ""

    @property
    def command(self) -> str:
        shown = ("python", *self.argv[1:]) if self.argv[0] == PYTHON else self.argv
        return shlex.join(shown)


def _bench(name: str, args: list[str], cap_s: int, sizing: str, workdir: Path) -> Step:
    json_path = str(workdir / f"{name}.json")
    return Step(name, (PYTHON, "-m", "olmo2_fast", "bench", *args, "--json", json_path), cap_s, sizing, json_path)


def build_plan(outdir: Path, workdir: Path, xdist: bool) -> list[Step]:
    """Every step, in order. Caps are estimates until a card has run the plan: the summary's
    Steps table shows each step's seconds beside its cap, so the first run re-sizes them.
    The bench steps come in the order of the targets they feed (7B carries the most)."""
    junit = str(outdir / JUNIT)
    workers = ["-n", str(min(TEST_WORKERS, os.cpu_count() or 1))] if xdist else []
    decode_point = ["--batch", "1", "--seq", str(PROMPT_LEN)]
    return [
        Step("install", (PYTHON, "-m", "pip", "install", "--no-index", "--no-deps", "--no-build-isolation",
                         "--disable-pip-version-check", "-q", "-e", "."), 40,
             "an editable install of a pure-Python package: ~10 s"),
        Step("tests", (PYTHON, "-m", "pytest", "tests", "-p", "olmo2_fast.benchmarks.gpu_test_selection", "-q", "-rfE",
                       "--durations=25", "-p", "no:cacheprovider", "--junitxml", junit, *workers), 150,
             "~450 tests; the slowest are the sm_80/sm_90 compile checks (CPU-bound subprocesses, about a minute "
             "on 2 cores here) and Triton's first compile of each kernel variant; spread over the xdist workers",
             junit),
        _bench("generate-7b", ["generate", "--size", "7b", "--int4", *decode_point], 130,
               "5 engines (bf16 and int4, CUDA graphs on/off, then HF) x (1 warm-up + 3 timed) x 128-token runs: "
               "~25 s of decoding; Triton compiles and int4 autotuning ~30 s; HF's torch.compile of its decode "
               "step ~60 s. Rows are saved after each engine, so a cap hit loses HF at most", workdir),
        _bench("generate-1b", ["generate", "--size", "1b", "--int4", *decode_point], 95,
               "as generate-7b with a 16-layer model: decoding ~10 s, compiles and HF's torch.compile ~70 s", workdir),
        _bench("kernels-7b", ["kernels", "--size", "7b", "--batch", "1", "16", "--no-compile"], 90,
               "~55 cases, ~115 candidates at ~0.3 s each (warm-up, graph capture, 100 ms of replays), Triton's "
               "first compile of each decode GEMV variant (prologue x format x rows) ~30 s, int4 autotuning; "
               "torch.compile baselines left out (--no-compile): inductor takes ~5-15 s per case", workdir),
        _bench("kernels-1b", ["kernels", "--size", "1b", "--batch", "1", "16", "--no-compile", "--kernels",
                              *FUSED_DECODE_KERNELS], 25,
               "the fused decode step's kernels only, at 1B shapes: ~25 cases, compiles cached by kernels-7b", workdir),
    ]


# --------------------------------------------------------------------------- the environment


def _nvidia_smi() -> dict:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"gpu": f"none ({type(e).__name__}: nvidia-smi unavailable)"}
    gpus = [line.split(", ") for line in proc.stdout.strip().splitlines() if line.count(", ") == 2]
    if proc.returncode != 0 or not gpus:
        return {"gpu": f"none (nvidia-smi: {(proc.stderr or proc.stdout).strip()[:120]})"}
    name, driver, memory = gpus[0]
    return {"gpu": name, "gpu_count": len(gpus), "driver": driver, "gpu_memory": memory}


def environment() -> dict:
    """The card, driver, versions and date, read without importing torch (nothing is installed yet)."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **_nvidia_smi(),
            "python": sys.version.split()[0], "python_path": PYTHON, "host": host_name(),
            **{package: package_version(package) for package in PACKAGES}}


def format_environment(env: dict) -> str:
    gpu = env["gpu"] if "driver" not in env else (f"{env['gpu']} x{env['gpu_count']}, driver {env['driver']}, "
                                                   f"{env['gpu_memory']}")
    versions = ", ".join(f"{package} {env[package] or 'not installed'}" for package in PACKAGES)
    return (f"gpu_check {env['date']}\n  GPU: {gpu}\n  python {env['python']} ({env['python_path']})\n"
            f"  {versions}\n  host: {env['host']}")


# --------------------------------------------------------------------------- running the plan


@dataclass
class StepResult:
    name: str
    command: str
    cap_s: float               # the cap it ran under (its own, or less when the budget ran short)
    status: str                # "ok", "failed (exit N)", "timed out after N s", "not run: ..."
    returncode: int | None
    seconds: float
    result: str | None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _kill_group(pid: int):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def run_step(step: Step, cap_s: float, log) -> StepResult:
    """Run one step with its output appended to `log`, in its own process group. At cap - grace
    its main process gets SIGINT (pytest still writes its XML, a bench keeps the rows it saved);
    at the cap the whole group is killed. Whatever the step leaves running is killed too, so
    no test worker or compile pool is still on the GPU when the next step is timed."""
    log.write(f"\n===== {step.name}: {step.command} (cap {cap_s:.0f} s)\n".encode())
    log.flush()
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell that starts gpu_check in the background leaves SIGINT ignored, and a step would inherit
    # that and sleep through the SIGINT below: each step starts with SIGINT at its default.
    proc = subprocess.Popen(step.argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    timed_out = False
    try:
        proc.wait(timeout=max(cap_s - INTERRUPT_GRACE_S, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=max(cap_s - (time.monotonic() - start), 1))
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
    finally:
        _kill_group(proc.pid)
    seconds = time.monotonic() - start
    if timed_out:
        status = f"timed out: interrupted at {max(cap_s - INTERRUPT_GRACE_S, 1):.0f} s, ended at {seconds:.0f} s"
    else:
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    log.write(f"===== {step.name}: {status} in {seconds:.1f} s\n".encode())
    log.flush()
    return StepResult(step.name, step.command, round(cap_s), status, proc.returncode, seconds, step.result)


def run_plan(steps: list[Step], log, budget_s: float, say=print) -> list[StepResult]:
    """Every step in order, none fatal to the next; a step starts only with MIN_STEP_S of the budget left."""
    deadline = time.monotonic() + budget_s
    results = []
    for step in steps:
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            results.append(StepResult(step.name, step.command, 0, f"not run: {max(left, 0):.0f} s of the budget left",
                                      None, 0.0, step.result))
            say(f"[gpu_check] {step.name}: {results[-1].status}")
            continue
        cap = min(step.cap_s, left)
        say(f"[gpu_check] {step.name} (cap {cap:.0f} s): {step.command}")
        results.append(run_step(step, cap, log))
        say(f"[gpu_check] {step.name}: {results[-1].status} in {results[-1].seconds:.0f} s")
    return results


def _fit_log(path: Path):
    """Keep check.log under the size that comes back: its head and its tail."""
    size = path.stat().st_size
    if size <= MAX_FILE_BYTES:
        return
    with open(path, "rb") as f:
        head = f.read(2**20)
        f.seek(size - (MAX_FILE_BYTES - 2**21))
        tail = f.read()
    path.write_bytes(head + f"\n[... {size - len(head) - len(tail)} bytes cut by gpu_check ...]\n".encode() + tail)


def outdir_problems(outdir: Path) -> list[str]:
    """Why OUTDIR would not come back whole from the GPU machine (empty when it would)."""
    problems, files = [], [p for p in outdir.rglob("*") if p.is_file()]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files, more than {MAX_FILES}")
    for path in outdir.rglob("*"):
        relative = path.relative_to(outdir)
        if not all(SAFE_NAME.fullmatch(part) for part in relative.parts):
            problems.append(f"{relative}: a name outside letters, digits, '.', '_' and '-'")
        if path.is_file() and len(relative.parts) - 1 > MAX_DEPTH:
            problems.append(f"{relative}: more than {MAX_DEPTH} folders deep")
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            problems.append(f"{relative}: {path.stat().st_size} bytes, over {MAX_FILE_BYTES}")
    return problems


def run(outdir: Path, workdir: Path) -> int:
    start = time.monotonic()
    env = environment()
    steps = build_plan(outdir, workdir, xdist=importlib.util.find_spec("xdist") is not None)
    with open(outdir / LOG, "ab") as log:
        def say(line: str):
            print(line, flush=True)
            log.write(f"{line}\n".encode())
            log.flush()

        say(format_environment(env))
        say(f"[gpu_check] bench JSON files go to {workdir}; results go to {outdir}")
        results = run_plan(steps, log, TOTAL_BUDGET_S - SUMMARY_RESERVE_S - (time.monotonic() - start), say)
        step_rows = [asdict(r) for r in results]
        (workdir / "steps.json").write_text(json.dumps({"environment": env, "steps": step_rows}, indent=1) + "\n")
        try:
            markdown = write_summary(outdir, env, step_rows, outdir / JUNIT, TOTAL_BUDGET_S, time.monotonic() - start)
        except Exception:  # the steps' own output is in check.log: say why there is no summary and keep it
            say(f"[gpu_check] the summary failed; the steps' output is in {outdir / LOG}\n{traceback.format_exc()}")
            markdown = None
    _fit_log(outdir / LOG)
    if markdown is not None:
        print(f"\n{markdown}", flush=True)
    for problem in outdir_problems(outdir):
        print(f"[gpu_check] WARNING: OUTDIR will not come back whole: {problem}", flush=True)
    return 0 if markdown is not None and all(r.ok for r in results) else 1


# --------------------------------------------------------------------------- --dry-run


@dataclass
class Check:
    """One parse check: done at once (argparse) or a subprocess still running."""
    ok: bool | None = None
    message: str = ""
    proc: subprocess.Popen | None = None
    describe: Callable[[int, str], str] | None = None  # (returncode, output) -> message, for a subprocess

    def result(self) -> tuple[bool, str]:
        if self.proc is not None:
            output, _ = self.proc.communicate()
            return self.proc.returncode == 0, self.describe(self.proc.returncode, output)
        return bool(self.ok), self.message


def _last_line(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "(no output)"


def _start(argv: list[str], describe) -> Check:
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    return Check(proc=proc, describe=describe)


def _check_pip(step: Step) -> Check:
    return _start([*step.argv, "--dry-run"], lambda rc, out: "pip install --dry-run: the project's metadata builds "
                  "offline" if rc == 0 else f"pip install --dry-run failed: {_last_line(out)}")


def _check_pytest(step: Step) -> Check:
    return _start([*step.argv, "--collect-only"],
                  lambda rc, out: f"pytest --collect-only: {_last_line(out)}")


def _check_olmo2_fast(step: Step) -> Check:
    try:
        from olmo2_fast.cli import build_parser
    except ImportError as e:
        return Check(False, f"olmo2_fast is not importable here ({e}): install it first (pip install -e .)")
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(list(step.argv[3:]))
    except SystemExit:
        return Check(False, f"does not parse: {_last_line(stderr.getvalue())}")
    return Check(True, f"argparse: olmo2-fast {args.command} {getattr(args, 'bench_command', '')}".rstrip())


CHECKS = {"pip": _check_pip, "pytest": _check_pytest, "olmo2_fast": _check_olmo2_fast}


def check_step(step: Step) -> Check:
    checker = CHECKS.get(step.module)
    if checker is None:
        return Check(False, f"no parse check for {step.command!r}: add one to gpu_check.CHECKS")
    return checker(step)


def dry_run(outdir: Path) -> int:
    xdist = importlib.util.find_spec("xdist") is not None
    print(format_environment(environment()))
    print(f"\ngpu_check plan for OUTDIR={outdir} (dry run: nothing heavy runs)")
    with tempfile.TemporaryDirectory(prefix="gpu_check-dry-") as scratch:
        shown = build_plan(outdir, Path("WORKDIR"), xdist)
        for number_, step in enumerate(shown, 1):
            print(f"{number_}. {step.name} (cap {step.cap_s} s): {step.command}\n   sized: {step.sizing}")
        caps = sum(step.cap_s for step in shown)
        print(f"then: the summary into OUTDIR ({LOG}, {JUNIT}, summary.md, results.json, results.csv)\n"
              f"caps sum to {caps} s; the budget is {TOTAL_BUDGET_S} s with {SUMMARY_RESERVE_S} s kept for the "
              f"summary{'' if xdist else '; pytest-xdist is not installed here, so tests would run in one process'}")
        checked = build_plan(Path(scratch), Path(scratch), xdist)
        pending = [(step.name, check_step(step)) for step in checked]
        pending.append(("gpu_check.sh", _start(["bash", "-n", str(SCRIPT)], lambda rc, out: "bash -n: the script "
                                               "parses" if rc == 0 else f"bash -n: {_last_line(out)}")))
        failures = 0
        print("\nchecks:")
        for name, check in pending:
            ok, message = check.result()
            failures += not ok
            print(f"  {name:<13} {'ok  ' if ok else 'FAIL'} {message}")
    if caps > TOTAL_BUDGET_S - SUMMARY_RESERVE_S:
        print(f"FAIL: the caps sum to {caps} s, over the {TOTAL_BUDGET_S - SUMMARY_RESERVE_S} s the steps may take")
        failures += 1
    print("dry run: every command parses" if not failures else f"dry run: {failures} check(s) failed")
    return 0 if not failures else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="an empty or new folder for check.log, tests.xml, summary.md, "
                        "results.json and results.csv")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check that every command parses")
    parser.add_argument("--work-dir", type=Path, help="where the bench steps write their JSON (default: a new "
                        "temporary folder)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run:
        return dry_run(args.outdir)
    if args.outdir.exists() and (not args.outdir.is_dir() or any(args.outdir.iterdir())):
        print(f"gpu_check: error: OUTDIR {args.outdir} is not an empty folder: give a new or empty one",
              file=sys.stderr)
        return 2
    args.outdir.mkdir(parents=True, exist_ok=True)
    workdir = args.work_dir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    return run(args.outdir.resolve(), workdir.resolve())


if __name__ == "__main__":
    sys.exit(main())
