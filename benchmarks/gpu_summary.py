"""The end of `gpu_check`: each figure against its target, what each step did, the tests' outcome.

Reads what the steps left (the bench JSON files, pytest's junit XML) and writes into OUTDIR
  summary.md    figures against targets.TARGETS, steps, tests, the benchmark rows;
  results.json  the same as data, with every benchmark row and its environment;
  results.csv   every benchmark row, with the step it came from.
Only rows measured on a GPU at real shapes (`mode` "gpu") count towards a figure: CPU smoke
numbers are never GPU figures. Standard library only, like gpu_check, so that it still runs
when the project could not be installed.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .report import number, percent, times, write_csv
from .targets import PROMPT_LEN, Target, card_of, measured_figures, targets_for

SUMMARY_MD, RESULTS_JSON, RESULTS_CSV = "summary.md", "results.json", "results.csv"
MAX_FAILURES_LISTED = 40


@dataclass(frozen=True)
class Measured:
    value: float | None
    source: str          # the rows it comes from, or why there is no value
    baseline: str = ""   # the baseline at the same point (HF transformers, cuBLAS)


def _rows(benches: dict, benchmark: str, model: str) -> list[dict]:
    return [row for doc in benches.values() if doc.get("benchmark") == benchmark for row in doc.get("rows", [])
            if row.get("mode") == "gpu" and row.get("model") == model]


def _missing(rows: list[dict]) -> str:
    notes = [row["note"] for row in rows if row.get("note")]
    return f"not measured: {notes[0]}" if notes else "not measured: no GPU rows at this point (see Steps)"


def _decode_point(benches: dict, model: str, quantize: str) -> tuple[list[dict], dict | None]:
    """Our engines' rows and HF's at batch 1 after a PROMPT_LEN-token prompt."""
    rows = [r for r in _rows(benches, "generate", model) if r.get("batch") == 1 and r.get("prompt_len") == PROMPT_LEN]
    ours = [r for r in rows if r.get("backend") != "hf" and r.get("quantize") == quantize]
    return ours, next((r for r in rows if r.get("backend") == "hf"), None)


def _point(row: dict) -> str:
    return f"{row['engine']}, {row['dtype']}, batch 1, prompt {row['prompt_len']} + {row['new_tokens']} new tokens"


def _best_at_decode_point(benches: dict, model: str, quantize: str, key: str, higher_is_better: bool,
                          unit: str) -> Measured:
    """Our best engine's `key` at the decode point, with HF's beside it ("ours 2.1x": how much faster)."""
    ours, hf = _decode_point(benches, model, quantize)
    timed = [r for r in ours if r.get(key)]
    if not timed:
        return Measured(None, _missing(ours))
    best = (max if higher_is_better else min)(timed, key=lambda r: r[key])
    baseline = "HF: not measured"
    if hf and hf.get(key):
        faster = best[key] / hf[key] if higher_is_better else hf[key] / best[key]
        baseline = f"HF {hf[key]:,.4g} {unit} (ours {faster:.2f}x)"
    return Measured(best[key], _point(best), baseline)


def decode_tokens_per_s(benches: dict, model: str, quantize: str) -> Measured:
    return _best_at_decode_point(benches, model, quantize, "tokens_per_s", True, "tokens/s")


def ttft_ms(benches: dict, model: str, quantize: str) -> Measured:
    return _best_at_decode_point(benches, model, quantize, "ttft_ms", False, "ms")


def int4_speedup(benches: dict, model: str, quantize: str) -> Measured:
    int4, bf16 = decode_tokens_per_s(benches, model, quantize), decode_tokens_per_s(benches, model, "none")
    if int4.value is None or bf16.value is None:
        return Measured(None, int4.source if int4.value is None else bf16.source)
    return Measured(int4.value / bf16.value, f"{int4.value:,.4g} / {bf16.value:,.4g} tokens/s (best engine of each)")


def _shape(row: dict) -> dict:
    """The named sizes of a kernel row's shape label ("W=qkv M=1 N=12288 K=4096")."""
    return dict(part.split("=", 1) for part in row.get("shape", "").split() if "=" in part)


def int4_gemv_gbps(benches: dict, model: str, quantize: str) -> Measured:
    """The slowest of the model's projections for our int4 kernel at M = 1, in effective GB/s."""
    rows = [r for r in _rows(benches, "kernels", model) if r.get("kernel") == "int4_matmul" and _shape(r).get("M") == "1"]
    ours = [r for r in rows if r.get("impl") == "triton"]
    timed = [r for r in ours if r.get("gbps")]
    if not timed:
        return Measured(None, _missing(ours))
    slowest = min(timed, key=lambda r: r["gbps"])
    each = ", ".join(f"{_shape(r)['W']} {r['gbps']:,.4g}" for r in timed)
    dense = [r for r in rows if r.get("impl", "").endswith(" matmul") and "dequant" not in r["impl"] and r.get("gbps")]
    baseline = (f"dense {dense[0]['impl'].removeprefix('torch ')} (cuBLAS): {min(r['gbps'] for r in dense):,.4g} GB/s "
                "slowest" if dense else "")
    return Measured(slowest["gbps"], f"triton int4_matmul M=1, GB/s per projection: {each}", baseline)


@dataclass(frozen=True)
class FigureSpec:
    label: str
    bench: str                                    # the `olmo2-fast bench` subcommand whose rows it reads
    measure: Callable[[dict, str, str], Measured]


FIGURES = {  # label: {q} is the quantisation ("bf16" or "int4")
    "decode_tokens_per_s": FigureSpec("{q} batch-1 decode", "generate", decode_tokens_per_s),
    "ttft_ms": FigureSpec(f"{{q}} TTFT, {PROMPT_LEN}-token prompt", "generate", ttft_ms),
    "int4_speedup": FigureSpec("int4 / bf16 batch-1 decode", "generate", int4_speedup),
    "int4_gemv_gbps": FigureSpec("int4 GEMV (M=1), slowest projection", "kernels", int4_gemv_gbps),
}


def verdict(value: float | None, here: Target | None) -> str:
    if value is None:
        return "not measured"
    if here is None:
        return "-"
    if here.met_by(value):
        return "meets"
    share = value / here.bound if here.op == ">=" else here.bound / value
    return f"MISSES ({100 * share:.0f}% of the bound)"


def figures(benches: dict, card: str | None) -> list[dict]:
    out = []
    for figure, model, quantize in measured_figures():
        spec = FIGURES[figure]
        measured = spec.measure(benches, model, quantize)
        here, elsewhere = targets_for(card, figure, model, quantize)
        target = here.describe() if here else (
            f"none for {card or 'this GPU'}; elsewhere " + "; ".join(t.describe() for t in elsewhere))
        out.append({"figure": figure, "label": f"{model.upper()} " + spec.label.format(q="bf16" if quantize == "none"
                                                                                       else quantize),
                    "model": model, "quantize": quantize, "value": measured.value, "unit": (here or elsewhere[0]).unit,
                    "target": target, "verdict": verdict(measured.value, here), "source": measured.source,
                    "baseline": measured.baseline})
    return out


def read_junit(path: Path) -> dict | None:
    """Counts and failures from pytest's junit XML, or None when pytest left none."""
    if not path.is_file():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        for problem in case:
            if problem.tag in ("failure", "error"):
                message = (problem.get("message") or problem.text or "").strip().splitlines() or [""]
                failed.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "kind": problem.tag,
                               "message": message[0][:200]})
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "seconds": sum(float(s.get("time", 0)) for s in suites), "failed": failed}


def load_benches(steps: list[dict]) -> dict:
    """{step name: the JSON a bench step wrote}, for the steps whose JSON exists."""
    benches = {}
    for step in steps:
        path = Path(step["result"]) if step.get("result") else None
        if path and path.suffix == ".json" and path.is_file():
            benches[step["name"]] = json.loads(path.read_text())
    return benches


def _table(headers: list[str], rows: list[list]) -> list[str]:
    def cell(value) -> str:
        return str(value).replace("|", "/").replace("\n", " ")

    return (["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def _clip(text, width: int = 90) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= width else text[:width - 3] + "..."


def _value(entry: dict) -> str:
    return "-" if entry["value"] is None else f"{entry['value']:,.4g} {entry['unit']}"


def _step_status(step: dict, benches: dict) -> str:
    status = step["status"]
    doc = benches.get(step["name"])
    if doc is not None and not doc.get("complete", True):
        status += f" (partial: {len(doc.get('rows', []))} rows saved before it stopped)"
    return status


def _tests_lines(tests: dict | None, step: dict | None) -> list[str]:
    if tests is None:
        return ["No junit XML: pytest was stopped before it wrote one, or did not run (see check.log)."]
    stopped = " pytest was stopped at its cap: the tests after that point did not run (check.log)." if (
        step and step["status"].startswith("timed out")) else ""
    lines = [f"{tests['tests']} tests: {tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
             f"{tests['skipped']} skipped ({tests['seconds']:.0f} s in pytest).{stopped}"]
    for failure in tests["failed"][:MAX_FAILURES_LISTED]:
        lines.append(f"- {failure['kind']}: `{failure['test']}`: {failure['message']}")
    if len(tests["failed"]) > MAX_FAILURES_LISTED:
        lines.append(f"- ... and {len(tests['failed']) - MAX_FAILURES_LISTED} more (tests.xml)")
    return lines


def _generate_lines(benches: dict) -> list[str]:
    fmt = number(4)
    rows = [[name, r["engine"], r["batch"], r["prompt_len"], r["new_tokens"], fmt(r.get("ttft_ms")),
             fmt(r.get("decode_ms_per_token")), fmt(r.get("tokens_per_s")), times(r.get("vs_hf")),
             number(3)(r.get("peak_mem_gb")), _clip(r.get("note"))]
            for name, doc in benches.items() if doc.get("benchmark") == "generate" for r in doc.get("rows", [])]
    headers = ["step", "engine", "B", "prompt", "new", "TTFT ms", "decode ms/step", "tokens/s", "x HF tok/s",
               "peak GB", "note"]
    return _table(headers, rows) if rows else ["No generate rows."]


def _kernel_lines(benches: dict) -> list[str]:
    fmt = number(4)
    lines, rows = [], []
    for name, doc in benches.items():
        if doc.get("benchmark") != "kernels":
            continue
        peaks = doc.get("peaks", {})
        if peaks:
            lines.append(f"- {name} ceilings: {fmt(peaks.get('peak_gbps'))} GB/s, {fmt(peaks.get('peak_tflops'))} "
                         f"TFLOP/s ({peaks.get('how', '')})")
        rows += [[name, r["kernel"], r["phase"], r["shape"], fmt(r.get("median_ms")), fmt(r.get("gbps")),
                  number(3)(r.get("tflops")), percent(r.get("roofline_fraction")), times(r.get("speedup")),
                  times(r.get("speedup_vs_dense")), number(2)(r.get("max_err")), _clip(r.get("note"))]
                 for r in doc.get("rows", []) if r.get("impl") == "triton"]
    headers = ["step", "kernel", "phase", "shape", "median ms", "GB/s", "TFLOP/s", "roofline", "x eager", "x dense",
               "max err", "note"]
    return lines + [""] + _table(headers, rows) if rows else ["No kernel rows."]


def _gpu_name(environment: dict, benches: dict) -> str:
    """torch's device name from a GPU bench run, else nvidia-smi's (the same string)."""
    return next((doc["environment"]["gpu"] for doc in benches.values()
                 if doc.get("environment", {}).get("mode") == "gpu"), environment.get("gpu", "none"))


def render(environment: dict, steps: list[dict], benches: dict, tests: dict | None, figure_rows: list[dict],
           card: str | None, gpu: str, budget_s: float, elapsed_s: float) -> str:
    versions = ", ".join(f"{k} {environment.get(k) or '-'}" for k in ("torch", "triton", "transformers", "python"))
    lines = [f"# gpu_check: {gpu}, {environment.get('date', '')}", "",
             f"{versions}; driver {environment.get('driver', '-')}; host {environment.get('host', '-')}. "
             f"Targets of card: {card or 'none (no row of targets.CARDS matches this GPU)'}. "
             f"Took {elapsed_s:.0f} s of a {budget_s:.0f} s budget.", "",
             "## Figures against the targets", ""]
    lines += _table(["figure", "measured", "target", "stands", "baseline, same point", "from"],
                    [[f["label"], _value(f), f["target"], f["verdict"], f["baseline"] or "-", f["source"]]
                     for f in figure_rows])
    lines += ["", "## Steps", ""]
    lines += _table(["step", "status", "seconds", "cap s", "command"],
                    [[s["name"], _step_status(s, benches), f"{s['seconds']:.0f}", s["cap_s"], f"`{s['command']}`"]
                     for s in steps])
    test_step = next((s for s in steps if s.get("result") and s["result"].endswith(".xml")), None)
    lines += ["", "## Tests", ""] + _tests_lines(tests, test_step)
    lines += ["", "## bench generate", ""] + _generate_lines(benches)
    lines += ["", "## bench kernels (our Triton rows; every candidate is in results.csv)", ""] + _kernel_lines(benches)
    return "\n".join(lines) + "\n"


def write_summary(outdir: Path, environment: dict, steps: list[dict], junit: Path, budget_s: float,
                  elapsed_s: float) -> str:
    """Write summary.md, results.json and results.csv into `outdir`; return the markdown."""
    benches = load_benches(steps)
    tests = read_junit(junit)
    gpu = _gpu_name(environment, benches)
    card = card_of(gpu)
    figure_rows = figures(benches, card)
    markdown = render(environment, steps, benches, tests, figure_rows, card, gpu, budget_s, elapsed_s)
    (outdir / SUMMARY_MD).write_text(markdown)
    document = {"environment": environment, "gpu": gpu, "card": card, "budget_s": budget_s, "elapsed_s": elapsed_s,
                "figures": figure_rows, "steps": steps, "tests": tests, "benchmarks": benches}
    (outdir / RESULTS_JSON).write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
    write_csv(outdir / RESULTS_CSV, [{"step": name, "benchmark": doc.get("benchmark"), **row}
                                     for name, doc in benches.items() for row in doc.get("rows", [])])
    return markdown
