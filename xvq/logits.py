"""Log-softmax math on logit rows, shared by the stages that compare distributions (validate's
report, the mix's sensitivity measurement): a foundation module, so neither stage imports the
other for it."""
from __future__ import annotations

import numpy as np


def log_sum_exp(logits: np.ndarray, row_max: np.ndarray | None = None) -> np.ndarray:
    """Row-wise log(sum(exp(x))): one temporary, exp in place, float64 sums (like llama.cpp's)."""
    m = logits.max(axis=1) if row_max is None else row_max
    e = np.subtract(logits, m[:, None])
    np.exp(e, out=e)
    return m.astype(np.float64) + np.log(e.sum(axis=1, dtype=np.float64))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return logits.astype(np.float64) - log_sum_exp(logits)[:, None]


def full_kld(ref_logp: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Full-vocabulary KL(ref || artifact) per row; ref_logp already normalised."""
    logq = logits.astype(np.float64) - log_sum_exp(logits)[:, None]
    p = np.exp(ref_logp.astype(np.float64))
    return (p * (ref_logp - logq)).sum(axis=1)
