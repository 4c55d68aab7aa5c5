"""`olmo2-fast bench`: the smoke runs of both subcommands and their output, and the roofline arithmetic.

The CLI runs with --smoke, so on a GPU machine too this stays a quick run of tiny shapes. The cost
functions are checked against byte and FLOP counts worked out by hand at real OLMo-2-7B shapes
(hidden 4096, 32 heads of 128, intermediate 11008, bf16 = 2 bytes).
"""
import csv
import importlib.util
import json
import math

import pytest
import torch

from olmo2_fast.benchmarks.cli import NO_GPU
from olmo2_fast.benchmarks.generate import engine_specs, floor_fractions, grid_points, kv_bytes_per_token, weight_bytes
from olmo2_fast.benchmarks.kernel_cases import dense_matmul_cost
from olmo2_fast.benchmarks.kernels import roofline
from olmo2_fast.benchmarks.shapes import KERNELS
from olmo2_fast.benchmarks.timing import Peaks, rotation_sets, summarize
from olmo2_fast.cli import build_parser, main
from olmo2_fast.kernels.attention import attention_decode_cost, attention_prefill_cost
from olmo2_fast.kernels.int4_matmul import int4_matmul_cost
from olmo2_fast.kernels.qk_norm_rope import qk_norm_rope_cost
from olmo2_fast.kernels.rmsnorm import residual_rmsnorm_cost, rmsnorm_cost
from olmo2_fast.kernels.swiglu import swiglu_cost

ON_GPU = torch.cuda.is_available()
ENV_FIELDS = ("mode", "gpu", "device", "host", "torch", "triton", "date")
BF16 = torch.bfloat16


def _run(capsys, argv):
    assert main(argv) == 0
    return capsys.readouterr()


def _check_env(env: dict):
    assert env["mode"] == ("gpu-smoke" if ON_GPU else "cpu-smoke")
    assert env["gpu"] == (torch.cuda.get_device_name() if ON_GPU else "none")
    assert env["torch"] == torch.__version__ and env["triton"] and env["date"][:4].isdigit()


def test_bench_kernels_smoke(tmp_path, capsys):
    out = _run(capsys, ["bench", "kernels", "--smoke", "--json", str(tmp_path / "k.json"), "--csv", str(tmp_path / "k.csv")])
    header = next(line for line in out.out.splitlines() if line.startswith("kernel "))
    for column in ("phase", "shape", "impl", "p20", "p80", "GB/s", "TFLOP/s", "roofline", "x eager", "x dense", "max err"):
        assert column in header
    if not ON_GPU:
        assert NO_GPU in out.err and "CPU-smoke ms" in header and "CPU SMOKE RUN" in out.out
        assert "not GPU figures" in out.out

    doc = json.loads((tmp_path / "k.json").read_text())
    assert doc["benchmark"] == "kernels" and doc["peaks"]["peak_gbps"] > 0 and doc["peaks"]["peak_tflops"] > 0
    _check_env(doc["environment"])
    rows = doc["rows"]
    assert {r["kernel"] for r in rows} == set(KERNELS)
    for row in rows:
        assert {f: row[f] for f in ENV_FIELDS} == {f: doc["environment"][f] for f in ENV_FIELDS}
        for key in ("median_ms", "p20_ms", "p80_ms", "gbps", "tflops", "roofline_fraction", "speedup", "max_err",
                    "bytes", "flops", "peak_gbps", "peak_tflops", "note"):
            assert key in row, key
    impls = {}
    for row in rows:
        impls.setdefault((row["kernel"], row["shape"]), []).append(row["impl"])
    for (kernel, _), names in impls.items():
        expected = ["triton", "torch eager", "torch.compile"]
        if kernel.startswith("attention"):
            expected.append("torch sdpa")
        if kernel == "fused_attention_decode":
            expected = ["triton", "triton unfused", "torch eager", "torch.compile"]
        if kernel == "int4_matmul":
            expected = ["triton", "torch dequant+matmul", "torch.compile", "torch float32 matmul" if not ON_GPU
                        else "torch bfloat16 matmul"]
        assert [n.split(" (")[0] for n in names] == expected
    phases = {(r["kernel"], r["phase"]) for r in rows}
    assert ("int4_matmul", "decode") in phases and ("int4_matmul", "prefill") in phases

    for row in rows:
        if row["impl"] == "triton" or row["impl"].startswith("torch eager"):
            assert row["note"] == "" and row["max_err"] < (1e-4 if row["dtype"] == "float32" else 5e-2), row
        if row["median_ms"] is None:
            continue
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        seconds = row["median_ms"] / 1e3
        assert math.isclose(row["gbps"], row["bytes"] / seconds / 1e9, rel_tol=1e-9)
        floor = max(row["bytes"] / (row["peak_gbps"] * 1e9), row["flops"] / (row["peak_tflops"] * 1e12))
        assert math.isclose(row["roofline_fraction"], floor / seconds, rel_tol=1e-9)
        if row["impl"] in ("torch eager", "torch dequant+matmul"):
            assert row["speedup"] == 1.0
    dense = [r for r in rows if r["kernel"] == "int4_matmul" and r["impl"].endswith(" matmul")
             and "dequant" not in r["impl"]]
    assert dense and all(r["speedup_vs_dense"] == 1.0 for r in dense)

    with open(tmp_path / "k.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and {"gpu", "torch", "triton", "date", "median_ms", "max_err"} <= set(table[0])


def test_bench_generate_smoke(tmp_path, capsys):
    out = _run(capsys, ["bench", "generate", "--smoke", "--int4", "--seq", "8", "--rep", "2",
                        "--json", str(tmp_path / "g.json"), "--csv", str(tmp_path / "g.csv")])
    header = next(line for line in out.out.splitlines() if line.startswith("engine "))
    for column in ("TTFT ms", "decode ms/step", "tokens/s", "% floor", "peak GB", "x HF tok/s"):
        assert column in header
    assert "% floor: weight + KV bytes per decode step / measured copy bandwidth" in out.out
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["benchmark"] == "generate"
    _check_env(doc["environment"])
    rows = doc["rows"]
    engines = {r["engine"] for r in rows}
    with_hf = importlib.util.find_spec("transformers") is not None
    if ON_GPU:
        assert {"olmo2_fast triton graphs", "olmo2_fast triton no-graphs", "olmo2_fast triton int4 graphs"} <= engines
    else:
        assert {"olmo2_fast torch", "olmo2_fast triton (interpreter)", "olmo2_fast triton int4 (interpreter)"} <= engines
    assert ("hf transformers" in engines) == with_hf
    for row in rows:
        assert not row["note"].startswith(("failed", "engine build failed")), row
        assert row["ttft_ms"] > 0 and row["tokens_per_s"] and row["decode_p20_ms"] <= row["decode_p80_ms"]
        assert (row["peak_mem_gb"] is not None) == ON_GPU
        for f in ENV_FIELDS:
            assert row[f] == doc["environment"][f]
    ours = [r for r in rows if r["backend"] != "hf" and not r["interpreted"]]
    assert ours and all((r["vs_hf"] is not None) == with_hf for r in ours)
    for row in (r for r in rows if r["backend"] != "hf"):
        assert row["decode_bytes"] > 0 and row["floor_pct"] == pytest.approx(100 * row["floor_ms"] /
                                                                             row["decode_ms_per_token"])
        assert row["decode_path"] in (("torch",) if row["backend"] == "torch" else ("fused", "cublas"))
    with open(tmp_path / "g.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)


def test_decode_paths_and_the_bytes_a_decode_step_reads(tmp_path):
    """--decode-path both gives the kernels a row per path (on a GPU each with and without graphs); a step's
    floor bytes are the projections and lm_head as the engine holds them (int4: codes, scales, zeros), not
    the embedding gather nor the norms, plus each row's KV cache."""
    labels = [s.name for s in engine_specs(True, True, graphs=True, hf=False, decode_path="both")]
    assert labels == [f"olmo2_fast triton{q} {path} {g}" for q in ("", " int4") for path in ("fused", "cublas")
                      for g in ("graphs", "no-graphs")]
    assert {s.decode_path for s in engine_specs(False, False, graphs=True, hf=True)} == {"auto"}
    from checkpoints import make_checkpoint
    from olmo2_fast import OLMo2
    path = make_checkpoint(tmp_path, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                           num_key_value_heads=1, num_hidden_layers=2)
    dense = OLMo2.from_pretrained(path, device="cpu", backend="torch").engine
    cfg = dense.config
    projections = cfg.num_hidden_layers * 128 * (cfg.q_width + 2 * cfg.kv_width + cfg.q_width + 2 * 256 + 256)
    assert weight_bytes(dense) == 4 * (projections + cfg.vocab_size * 128)  # float32
    int4 = OLMo2.from_pretrained(path, device="cpu", backend="torch", quantize="int4", quantize_lm_head=True).engine
    assert weight_bytes(int4) == sum(n * k // 2 + 2 * (k // 128) * n * 4 for n, k in  # codes + float32 scales, zeros
                                     [(cfg.q_width + 2 * cfg.kv_width, 128), (128, cfg.q_width), (512, 128), (128, 256)]
                                     * cfg.num_hidden_layers + [(cfg.vocab_size, 128)])
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * cfg.num_hidden_layers * cfg.kv_width * 2
    rows = [dict(decode_bytes=2e9, decode_ms_per_token=1.0), dict(decode_bytes=None, decode_ms_per_token=1.0)]
    floor_fractions(rows, bandwidth=4e12)
    assert rows[0]["floor_ms"] == pytest.approx(0.5) and rows[0]["floor_pct"] == pytest.approx(50)
    assert "floor_pct" not in rows[1]


def test_cli_parses_lists_and_rejects_bad_values(capsys):
    args = build_parser().parse_args(["bench", "kernels", "--batch", "1,4", "16", "--seq", "512", "--kernels", "swiglu"])
    assert [v for values in args.batch for v in values] == [1, 4, 16] and args.kernels == ["swiglu"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "kernels", "--batch", "0"])
    assert main(["bench", "generate", "--smoke", "--new-tokens", "1"]) == 2
    assert "--new-tokens must be >= 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- roofline arithmetic at 7B

def test_norm_and_swiglu_costs_at_7b():
    # residual_rmsnorm, one decode token: read x, residual and the weight, write out: 4 vectors of 4096 bf16.
    # FLOPs per element: square-and-add (2), times rstd, times weight, plus the residual add = 5.
    assert residual_rmsnorm_cost(1, 4096, BF16).bytes == 3 * 4096 * 2 + 4096 * 2 == 32768
    assert residual_rmsnorm_cost(1, 4096, BF16).flops == 5 * 4096
    assert rmsnorm_cost(16, 4096, BF16).bytes == (2 * 16 * 4096 + 4096) * 2 == 270_336
    # swiglu at a 2048-token prefill: read gate and up (2 x 11008), write 11008, per token.
    assert swiglu_cost(2048, 11008, BF16).bytes == 3 * 2048 * 11008 * 2 == 135_266_304
    assert swiglu_cost(2048, 11008, BF16).flops == 4 * 2048 * 11008


def test_qk_norm_rope_cost_at_7b():
    # One token: qkv row 3 x 4096 bf16 in, q/k norm weights 2 x 4096 in, position and cache row (int32) in;
    # q, k and v (3 x 4096) out. FLOPs: 7 per q and k element (8192 of them); v is only copied.
    cost = qk_norm_rope_cost(1, 32, 32, 128, BF16)
    assert cost.bytes == 12288 * 2 + 8192 * 2 + 2 * 4 + 12288 * 2 == 65544
    assert cost.flops == 7 * 8192 == 57344


def test_attention_costs_at_7b():
    # Decode, one sequence with 4096 cached positions: q and out (32 x 128 each) plus K and V
    # (32 heads x 4096 x 128 each), bf16. Each of the 4096 (query, key) pairs costs 2 dots of 128 per head.
    decode = attention_decode_cost([4096], 32, 32, 128, BF16)
    assert decode.bytes == (2 * 32 * 128 + 2 * 32 * 4096 * 128) * 2 == 67_125_248
    assert decode.flops == 32 * 4096 * 2 * 2 * 128 == 67_108_864
    # Prefill of a 2048-token prompt: the causal mask keeps 2048 * 2049 / 2 pairs.
    prefill = attention_prefill_cost([2048], [2048], 32, 32, 128, BF16)
    assert prefill.bytes == (2 * 2048 * 32 * 128 + 2 * 2048 * 32 * 128) * 2 == 67_108_864
    assert prefill.flops == 32 * (2048 * 2049 // 2) * 2 * 2 * 128 == 34_376_515_584


def test_int4_and_dense_matmul_costs_at_7b():
    # gate_up at decode batch 1: W is 22016 x 4096. int4: half a byte per weight, plus a bf16 scale and
    # zero per 128 weights; x (4096) in and out (22016) in bf16. Dense: two bytes per weight.
    n, k = 2 * 11008, 4096
    int4 = int4_matmul_cost(1, n, k, BF16)
    assert int4.bytes == n * k // 2 + 2 * (n * k // 128) * 2 + (k + n) * 2 == 47_959_040
    assert int4.flops == 2 * n * k == 180_355_072
    assert dense_matmul_cost(1, n, k, BF16).bytes == (n * k + k + n) * 2 == 180_407_296


def test_roofline_fraction_and_bound():
    peaks = Peaks(bandwidth=3.0e12, flops=7.9e14, how="")
    cost = residual_rmsnorm_cost(1, 4096, BF16)                       # 32768 bytes: memory-bound
    fields = roofline(cost, 0.004, peaks)                            # 4 us measured
    assert fields["bound"] == "memory"
    assert math.isclose(fields["gbps"], 32768 / 4e-6 / 1e9)         # 8.192 GB/s
    assert math.isclose(fields["roofline_fraction"], (32768 / 3.0e12) / 4e-6)
    prefill = roofline(attention_prefill_cost([2048], [2048], 32, 32, 128, BF16), 0.1, peaks)
    assert prefill["bound"] == "compute"
    assert math.isclose(prefill["roofline_fraction"], 34_376_515_584 / 7.9e14 / 1e-4)


def test_timing_statistics_and_rotation():
    t = summarize([5.0, 1.0, 4.0, 2.0, 3.0], "cpu-clock")
    assert (t.median_ms, t.samples) == (3.0, 5)
    assert math.isclose(t.p20_ms, 1.8) and math.isclose(t.p80_ms, 4.2)
    l2 = 50 * 2**20
    assert rotation_sets(32768, 32768, l2, 2**30) == 3200               # 2 x L2 / 32 KiB
    assert rotation_sets(200 * 2**20, 200 * 2**20, l2, 2**34) == 1      # one set already passes 2 x L2
    assert rotation_sets(2**20, 2**26, l2, 2**28) == 4                  # capped by the memory budget
    assert rotation_sets(2**20, 2**20, 0, 0) == 2                       # CPU: two sets


def test_generate_grid():
    assert grid_points((1, 4, 16), (128, 2048)) == [(1, 128), (1, 2048), (4, 128), (16, 128)]
