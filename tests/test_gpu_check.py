"""benchmarks/gpu_check: the dry run parses every command of the plan, the plan measures every
target, the runner survives failing and overrunning steps, and the summary judges figures
against targets.TARGETS and fits what the GPU machine sends back.

Nothing here needs a GPU: steps are tiny `python -c` programs, bench rows are made up.
"""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from olmo2_fast.benchmarks import gpu_check, gpu_test_selection
from olmo2_fast.benchmarks.gpu_summary import FIGURES, write_summary
from olmo2_fast.benchmarks.shapes import GENERATE_GRID, KERNEL_GRID, resolve_grid
from olmo2_fast.benchmarks.targets import ANY_CARD, CARDS, PROMPT_LEN, TARGETS, card_of
from olmo2_fast.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_checks_every_command(tmp_path):
    outdir = tmp_path / "out"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(outdir)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = proc.stdout.split("\nchecks:\n")[1]
    for step in gpu_check.build_plan(outdir, tmp_path, xdist=False):
        assert f"{step.name} " in checks and step.command.split(" --json")[0] in proc.stdout
    assert checks.count(" ok   ") == len(gpu_check.build_plan(outdir, tmp_path, False)) + 1  # + bash -n
    assert "deselected" in checks and "dry run: every command parses" in proc.stdout
    assert not outdir.exists()  # a dry run writes nothing


def test_a_command_that_does_not_parse_fails_its_check(tmp_path):
    py = sys.executable
    bad_bench = gpu_check.Step("x", (py, "-m", "olmo2_fast", "bench", "kernels", "--batch", "0"), 1, "")
    ok, message = gpu_check.check_step(bad_bench).result()
    assert not ok and "--batch" in message
    unknown = gpu_check.Step("x", (py, "-c", "pass"), 1, "")
    assert gpu_check.check_step(unknown).result()[0] is False
    # a renamed selection plugin: pytest stops before importing conftest (fast)
    bad_tests = gpu_check.Step("x", (py, "-m", "pytest", "tests", "-p", "olmo2_fast.benchmarks.no_such_selection"), 1, "")
    ok, message = gpu_check.check_step(bad_tests).result()
    assert not ok and "no_such_selection" in message


def test_plan_measures_every_target_within_the_budget(tmp_path):
    plan = gpu_check.build_plan(tmp_path, tmp_path, xdist=True)
    assert sum(step.cap_s for step in plan) <= gpu_check.TOTAL_BUDGET_S - gpu_check.SUMMARY_RESERVE_S
    assert plan[0].name == "install" and plan[1].name == "tests"
    benches = [build_parser().parse_args(list(step.argv[3:])) for step in plan if step.module == "olmo2_fast"]

    def covers(args, figure, model, quantize) -> bool:
        bench = FIGURES[figure].bench
        if args.bench_command != bench or args.size != model or getattr(args, "model", None):
            return False
        flat = lambda lists: None if lists is None else [v for values in lists for v in values]  # noqa: E731
        grid = resolve_grid(GENERATE_GRID if bench == "generate" else KERNEL_GRID, flat(args.batch), flat(args.seq))
        if bench == "generate":
            return 1 in grid.batches and PROMPT_LEN in grid.seqs and (quantize == "none" or args.int4)
        return 1 in grid.batches and (args.kernels is None or "int4_matmul" in args.kernels)

    for target in TARGETS:
        assert any(covers(args, target.figure, target.model, target.quantize) for args in benches), target


def test_targets_table():
    for target in TARGETS:
        assert target.card in CARDS or target.card == ANY_CARD, target
        assert target.op in (">=", "<=") and target.figure in FIGURES, target
    targets_section = (ROOT / "README.md").read_text().split("### Targets")[1].split("\n### ")[0]
    for target in TARGETS:  # the README quotes the table
        row = f"{target.bound:,.4g} {target.unit.split()[0]}" if target.unit != "x bf16 tokens/s" else f"{target.bound}×"
        assert row in targets_section, (row, target)
    assert card_of("NVIDIA H100 80GB HBM3") == "H100" and card_of("NVIDIA H200") == "H200"
    assert card_of("NVIDIA H100 PCIe") is None and card_of("NVIDIA A100-SXM4-80GB") is None


def test_test_selection_keeps_non_heavy_and_heavy_bf16():
    def item(nodeid, heavy, dtype=None):
        callspec = SimpleNamespace(params={"dtype": dtype}) if dtype is not None else None
        return SimpleNamespace(nodeid=nodeid, keywords={"heavy": 1} if heavy else {}, callspec=callspec)

    assert gpu_test_selection.selected(item("tests/a.py::t", heavy=False, dtype=torch.float32))
    assert gpu_test_selection.selected(item("tests/a.py::t", heavy=True, dtype=torch.bfloat16))
    assert not gpu_test_selection.selected(item("tests/a.py::t", heavy=True, dtype=torch.float16))
    assert not gpu_test_selection.selected(item("tests/a.py::t", heavy=True))
    assert not gpu_test_selection.selected(item(next(iter(gpu_test_selection.SLOW_ON_A_GPU)), heavy=False))


# --------------------------------------------------------------------------- the runner


def _step(name, code, cap_s=30):
    return gpu_check.Step(name, (sys.executable, "-c", code), cap_s, "test")


def test_runner_survives_failures_and_overruns(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "INTERRUPT_GRACE_S", 1.5)
    saved = tmp_path / "saved"
    polite = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    open({str(saved)!r}, 'w').write('rows')\n    raise SystemExit(130)")
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    steps = [_step("fails", "import sys; sys.exit(3)"), _step("polite", polite, cap_s=3),
             _step("stubborn", stubborn, cap_s=3), _step("fine", "print('hello from a step')")]
    with open(tmp_path / "check.log", "ab") as log:
        results = gpu_check.run_plan(steps, log, budget_s=60, say=lambda line: None)
        late = gpu_check.run_plan([_step("late", "pass")], log, budget_s=gpu_check.MIN_STEP_S - 1, say=lambda _: None)
    status = {r.name: r.status for r in results}
    assert status["fails"] == "failed (exit 3)" and status["fine"] == "ok"
    assert status["polite"].startswith("timed out") and saved.read_text() == "rows"  # SIGINT came before the kill
    assert status["stubborn"].startswith("timed out") and results[2].seconds < 6       # killed at its cap
    assert late[0].status.startswith("not run")
    assert "hello from a step" in (tmp_path / "check.log").read_text()


def test_outdir_must_be_empty(tmp_path, capsys):
    (tmp_path / "old.txt").write_text("x")
    assert gpu_check.main([str(tmp_path)]) == 2
    assert "not an empty folder" in capsys.readouterr().err


# --------------------------------------------------------------------------- the summary


def _generate_row(model, engine, backend, quantize, tokens_per_s, ttft_ms, mode="gpu"):
    return {"engine": engine, "backend": backend, "quantize": quantize, "batch": 1, "prompt_len": PROMPT_LEN,
            "new_tokens": 128, "tokens_per_s": tokens_per_s, "ttft_ms": ttft_ms, "decode_ms_per_token": 1e3 / tokens_per_s,
            "model": model, "dtype": "bfloat16", "mode": mode, "note": ""}


def _int4_row(projection, impl, gbps):
    return {"kernel": "int4_matmul", "phase": "decode", "shape": f"W={projection} M=1 N=4096 K=4096", "impl": impl,
            "gbps": gbps, "median_ms": 0.01, "model": "7b", "mode": "gpu", "note": ""}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="1" tests="4" time="80.5"><testcase classname="tests.test_a" name="test_ok"/><testcase classname="tests.test_a"
name="test_skip"><skipped message="needs"/></testcase><testcase classname="tests.test_b" name="test_bad[dtype2]">
<failure message="AssertionError: 0.5 &gt; 0.01&#10;more">trace</failure></testcase></testsuite></testsuites>"""


def _fake_run(tmp_path, gpu: str):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir(), out.mkdir()
    (out / "tests.xml").write_text(JUNIT)
    docs = {
        "generate-7b": {"complete": False, "rows": [
            _generate_row("7b", "olmo2_fast triton graphs", "triton", "none", 180.0, 30.0),
            _generate_row("7b", "olmo2_fast triton int4 graphs", "triton", "int4", 500.0, 40.0)]},
        "generate-1b": {"complete": True, "rows": [
            _generate_row("1b", "olmo2_fast triton graphs", "triton", "none", 1200.0, 5.0),
            _generate_row("1b", "olmo2_fast triton no-graphs", "triton", "none", 500.0, 5.0),
            _generate_row("1b", "hf transformers", "hf", "none", 600.0, 9.0),
            _generate_row("1b", "olmo2_fast torch", "torch", "none", 99999.0, 0.1, mode="cpu-smoke")]},
        "kernels-7b": {"complete": True, "peaks": {"peak_gbps": 4300.0, "peak_tflops": 780.0, "how": "copy"}, "rows": [
            _int4_row("qkv", "triton", 2900.0), _int4_row("o", "triton", 2500.0),
            _int4_row("o", "torch bfloat16 matmul", 3100.0)]},
    }
    steps = [{"name": "tests", "command": "python -m pytest", "cap_s": 150, "status": "failed (exit 1)",
              "returncode": 1, "seconds": 90.0, "result": str(out / "tests.xml")}]
    for name, doc in docs.items():
        path = work / f"{name}.json"
        path.write_text(json.dumps({"benchmark": name.split("-")[0], "environment": {"mode": "gpu", "gpu": gpu}, **doc}))
        steps.append({"name": name, "command": f"python -m olmo2_fast bench {name}", "cap_s": 100, "seconds": 50.0,
                      "status": "timed out: interrupted at 85 s, ended at 90 s" if not doc["complete"] else "ok",
                      "returncode": 0, "result": str(path)})
    env = {"date": "2026-12-01T00:00:00+00:00", "gpu": gpu, "driver": "580", "torch": "2.11.0", "triton": "3.6.0"}
    markdown = write_summary(out, env, steps, out / "tests.xml", 540, 500.0)
    return out, markdown, json.loads((out / "results.json").read_text())


def _figure(document, label):
    return next(f for f in document["figures"] if f["label"] == label)


def test_summary_judges_each_figure_on_an_h100(tmp_path):
    out, markdown, document = _fake_run(tmp_path, "NVIDIA H100 80GB HBM3")
    assert document["card"] == "H100"
    one_b = _figure(document, "1B bf16 batch-1 decode")
    assert one_b["value"] == 1200.0 and one_b["verdict"] == "meets"          # best engine; CPU smoke rows never count
    assert "ours 2.00x" in one_b["baseline"] and "triton graphs" in one_b["source"]
    assert _figure(document, "7B bf16 batch-1 decode")["verdict"] == "MISSES (88% of the bound)"
    assert _figure(document, "7B int4 batch-1 decode")["verdict"] == "MISSES (98% of the bound)"
    ratio = _figure(document, "7B int4 / bf16 batch-1 decode")
    assert abs(ratio["value"] - 500 / 180) < 1e-9 and ratio["verdict"] == "meets"
    gemv = _figure(document, "7B int4 GEMV (M=1), slowest projection")
    assert gemv["value"] == 2500.0 and gemv["verdict"] == "MISSES (93% of the bound)" and "3,100" in gemv["baseline"]
    ttft = _figure(document, "7B bf16 TTFT, 512-token prompt")
    assert ttft["verdict"] == "MISSES (83% of the bound)" and ttft["baseline"] == "HF: not measured"
    assert "partial: 2 rows saved" in markdown and "`tests.test_b::test_bad[dtype2]`: AssertionError: 0.5 > 0.01" in markdown
    assert "4 tests: 2 passed, 1 failed, 0 errors, 1 skipped" in markdown
    assert (out / "summary.md").read_text() == markdown
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "summary.md", "tests.xml"]
    assert gpu_check.outdir_problems(out) == []
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + 9


def test_summary_on_a_card_without_a_given_target(tmp_path):
    _, markdown, document = _fake_run(tmp_path, "NVIDIA H200")
    assert _figure(document, "1B bf16 batch-1 decode")["verdict"] == "MISSES (80% of the bound)"  # H200: >= 1,500
    seven_b = _figure(document, "7B bf16 batch-1 decode")
    assert seven_b["verdict"] == "-" and seven_b["target"].startswith("none for H200; elsewhere >= 205")
    assert _figure(document, "7B int4 / bf16 batch-1 decode")["verdict"] == "meets"   # a ratio holds on any card
