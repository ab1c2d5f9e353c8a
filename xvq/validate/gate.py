"""The release gate: default thresholds per quant type, overridable per run.

Values are set from what llama.cpp's KL-divergence tables show for 7B-13B LLaMA-family models
(mean KLD: Q8_0 ~0.001, Q6_K ~0.004, Q5_K_M ~0.01, Q4_K_M ~0.03, Q3_K_M ~0.1, Q2_K ~0.4) with
room for noise; docs/report-schema.md lists them. A type not listed falls back to the nearest
bit width by its name (Q4_*, IQ4_* -> 4-bit row), and an unknown name to the loosest row.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Thresholds:
    max_kld: float              # mean KL divergence against the reference
    max_ppl_ratio: float        # perplexity / reference perplexity
    max_token_mismatch: float   # tokenizer mismatch rate against the HF tokenizer

    def as_dict(self) -> dict:
        return asdict(self)


# Share of tokens that llama.cpp tokenizes differently from HF. xvq's vocabulary is exact but for
# llama.cpp behaviours no GGUF can change (docs/tokenizer-parity.md: a text that starts with a
# punctuation mark or a space, about 0.2-0.6 per 1,000 tokens); a broken vocabulary is far above
# this (llama.cpp's own converter on XVERSE: 92 per 1,000; merge order lost: 16 per 1,000).
MISMATCH = 0.002

DEFAULTS: dict[str, Thresholds] = {
    "F32": Thresholds(0.0005, 1.002, MISMATCH),
    "F16": Thresholds(0.0005, 1.002, MISMATCH),
    "BF16": Thresholds(0.001, 1.005, MISMATCH),
    "Q8_0": Thresholds(0.005, 1.01, MISMATCH),
    "Q6_K": Thresholds(0.015, 1.02, MISMATCH),
    "Q5": Thresholds(0.04, 1.04, MISMATCH),
    "Q4": Thresholds(0.10, 1.10, MISMATCH),
    "Q3": Thresholds(0.30, 1.30, MISMATCH),
    "Q2": Thresholds(0.80, 1.80, MISMATCH),
    "Q1": Thresholds(1.50, 3.00, MISMATCH),
    "GPTQ-Int8": Thresholds(0.01, 1.02, MISMATCH),
    "GPTQ-Int4": Thresholds(0.12, 1.12, MISMATCH),
    "GPTQ-Int3": Thresholds(0.35, 1.35, MISMATCH),
    "GPTQ-Int2": Thresholds(1.00, 2.00, MISMATCH),
}
LOOSEST = DEFAULTS["Q1"]


def defaults_for(quant_type: str | None) -> Thresholds:
    q = (quant_type or "").upper()
    if q in DEFAULTS:
        return DEFAULTS[q]
    if q.startswith("GPTQ"):
        m = re.search(r"INT(\d)", q)
        return DEFAULTS.get(f"GPTQ-Int{m.group(1)}", LOOSEST) if m else LOOSEST
    m = re.match(r"I?Q(\d)", q)
    if m:
        bits = int(m.group(1))
        if bits >= 8:
            return DEFAULTS["Q8_0"]
        if bits == 6:
            return DEFAULTS["Q6_K"]
        return DEFAULTS.get(f"Q{bits}", LOOSEST)
    if q.startswith("TQ"):
        return LOOSEST
    return LOOSEST


def thresholds_for(quant_type: str | None, overrides: dict | None = None) -> Thresholds:
    """Defaults for the type, with any non-None override (max_kld, max_ppl_ratio, max_token_mismatch)."""
    base = defaults_for(quant_type).as_dict()
    for k, v in (overrides or {}).items():
        if v is not None:
            if k not in base:
                raise ValueError(f"unknown threshold {k!r}; use one of {', '.join(base)}")
            base[k] = float(v)
    return Thresholds(**base)


def judge(metrics: dict, t: Thresholds) -> list[str]:
    """Reasons an artifact (or one language of it) fails; empty when it passes."""
    reasons = []
    if metrics.get("kld_mean") is not None and metrics["kld_mean"] > t.max_kld:
        reasons.append(f"mean KLD {metrics['kld_mean']:.5f} > {t.max_kld:g}")
    if metrics.get("ppl_ratio") is not None and metrics["ppl_ratio"] > t.max_ppl_ratio:
        reasons.append(f"perplexity ratio {metrics['ppl_ratio']:.4f} > {t.max_ppl_ratio:g}")
    rate = metrics.get("token_mismatch_rate")
    if rate is not None and rate > t.max_token_mismatch:
        reasons.append(f"tokenizer mismatch rate {rate:.4f} > {t.max_token_mismatch:g}")
    return reasons
