"""The speed targets, per card: the one table that `gpu_check`'s summary reads and the README quotes.

A target names a figure (computed from the benchmark rows by `gpu_summary.FIGURES`), the model
and quantisation it is measured on, a comparison and a bound. Adding a card is one line in
CARDS (and its targets); adding a target is one line in TARGETS. Targets are benchmark goals,
checked when a card runs `benchmarks/gpu_check.sh`; no timed test asserts them.

Generate figures are batch-1 runs after a PROMPT_LEN-token prompt (issue 11: "batch-1 decode,
context 512"); the int4 GEMV figure is `bench kernels`' int4_matmul at M = 1 on the model's
four projections (the slowest of the four counts).
"""
from __future__ import annotations

from dataclasses import dataclass

# card -> a substring of torch.cuda.get_device_name() (the same string nvidia-smi prints) that
# identifies it. The H100 targets are for the SXM part (80 GB HBM3, 3.35 TB/s); a PCIe or NVL
# H100 has other bandwidth and gets no targets.
CARDS = {
    "H100": "H100 80GB HBM3",
    "H200": "H200",
}
ANY_CARD = "any"     # a ratio that holds on every card
PROMPT_LEN = 512     # the prompt before a measured batch-1 decode / TTFT


@dataclass(frozen=True)
class Target:
    card: str          # a key of CARDS, or ANY_CARD
    figure: str        # a key of gpu_summary.FIGURES
    model: str         # "1b", "7b", ... (config.PRESETS)
    quantize: str      # "none" or "int4"
    op: str            # ">=" or "<="
    bound: float
    unit: str
    source: str        # where the target was set

    def met_by(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def describe(self) -> str:
        card = "any card" if self.card == ANY_CARD else self.card
        return f"{self.op} {self.bound:,.4g} {self.unit} ({card}, {self.source})"


TARGETS = (
    Target("H100", "decode_tokens_per_s", "1b", "none", ">=", 1100, "tokens/s", "issue 11"),
    Target("H200", "decode_tokens_per_s", "1b", "none", ">=", 1500, "tokens/s", "issue 11"),
    Target("H100", "decode_tokens_per_s", "7b", "none", ">=", 205, "tokens/s", "issue 11"),
    Target("H100", "decode_tokens_per_s", "7b", "int4", ">=", 510, "tokens/s", "issue 12"),
    Target(ANY_CARD, "int4_speedup", "7b", "int4", ">=", 2.5, "x bf16 tokens/s", "issue 12"),
    Target("H100", "int4_gemv_gbps", "7b", "int4", ">=", 2700, "GB/s", "issue 12"),
    Target("H100", "ttft_ms", "7b", "none", "<=", 25, "ms", "issue 6"),
)


def card_of(gpu_name: str) -> str | None:
    """The CARDS key whose pattern the device name contains, or None for a card without targets."""
    return next((card for card, pattern in CARDS.items() if pattern in gpu_name), None)


def targets_for(card: str | None, figure: str, model: str, quantize: str) -> tuple[Target | None, list[Target]]:
    """(the target that applies on `card`, the same figure's targets on other cards, for reference)."""
    same = [t for t in TARGETS if (t.figure, t.model, t.quantize) == (figure, model, quantize)]
    here = next((t for t in same if t.card in (card, ANY_CARD)), None)
    return here, [t for t in same if t is not here]


def measured_figures() -> list[tuple[str, str, str]]:
    """Each (figure, model, quantize) some target names, in table order, once."""
    return list(dict.fromkeys((t.figure, t.model, t.quantize) for t in TARGETS))
