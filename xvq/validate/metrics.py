"""Log-softmax statistics, vectorised with numpy (no per-token Python loops).

The reference keeps, per scored position, its top-k logits with their ids, the log-sum-exp of
the full row, and the NLL of the target token: enough to score any number of artifacts later.
KL divergence against it is computed on the top-k tokens plus one "everything else" bin:

    KLD_k = sum_{i in topk} p_i (log p_i - log q_i)  +  p_rest (log p_rest - log q_rest)

which, by the log-sum inequality, never exceeds the full-vocabulary KLD and equals it once the
tail mass p_rest is negligible (or k >= n_vocab, where it is exact). The reference also keeps
full log-probabilities for a sample of positions, so every report shows KLD_k next to the
full-vocabulary KLD on the same positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_TOP_K = 128
FULL_SAMPLE_FLOATS = 1 << 22        # full reference rows kept for the top-k-vs-full check (16 MiB)


def log_sum_exp(logits: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(x))), float64 accumulation."""
    m = logits.max(axis=1)
    s = np.exp(logits - m[:, None]).sum(axis=1, dtype=np.float64)
    return m.astype(np.float64) + np.log(s)


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, logits) of the k largest per row, largest first."""
    v = logits.shape[1]
    if k >= v:
        ids = np.argsort(-logits, axis=1, kind="stable")
    else:
        part = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(logits, part, 1), axis=1, kind="stable")
        ids = np.take_along_axis(part, order, 1)
    return ids.astype(np.int32), np.take_along_axis(logits, ids, 1).astype(np.float32)


@dataclass
class RefRows:
    """Reference statistics of some scored positions."""
    ids: np.ndarray        # [n, k] int32, descending
    top: np.ndarray        # [n, k] float32 logits
    lse: np.ndarray        # [n] float64
    nll: np.ndarray        # [n] float64 NLL of the target

    def logp(self) -> np.ndarray:
        return self.top.astype(np.float64) - self.lse[:, None]


def reference_rows(logits: np.ndarray, targets: np.ndarray, k: int) -> RefRows:
    lse = log_sum_exp(logits)
    ids, top = top_k(logits, k)
    nll = lse - logits[np.arange(len(targets)), targets]
    return RefRows(ids, top, lse, nll)


@dataclass
class ArtifactRows:
    nll: np.ndarray        # [n]
    kld: np.ndarray        # [n] top-k + tail bin
    top1: np.ndarray       # [n] bool: same argmax as the reference


def kld_topk(ref: RefRows, logq_at_ref_ids: np.ndarray, exact: bool) -> np.ndarray:
    logp = ref.logp()
    p = np.exp(logp)
    kld = (p * (logp - logq_at_ref_ids)).sum(axis=1)
    if not exact:
        p_rest = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        q_rest = np.clip(1.0 - np.exp(logq_at_ref_ids).sum(axis=1), 1e-30, 1.0)
        tail = np.where(p_rest > 1e-12, p_rest * (np.log(np.maximum(p_rest, 1e-30)) - np.log(q_rest)), 0.0)
        kld = kld + tail
    return np.maximum(kld, 0.0)


def artifact_rows(logits: np.ndarray, targets: np.ndarray, ref: RefRows, n_vocab: int) -> ArtifactRows:
    lse = log_sum_exp(logits)
    nll = lse - logits[np.arange(len(targets)), targets]
    logq = np.take_along_axis(logits, ref.ids, 1).astype(np.float64) - lse[:, None]
    kld = kld_topk(ref, logq, exact=ref.ids.shape[1] >= n_vocab)
    top1 = logits.argmax(axis=1) == ref.ids[:, 0]
    return ArtifactRows(nll, kld, top1)


def full_kld(ref_logp: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Full-vocabulary KL(ref || artifact) per row; ref_logp already normalised."""
    logq = logits.astype(np.float64) - log_sum_exp(logits)[:, None]
    p = np.exp(ref_logp.astype(np.float64))
    return (p * (ref_logp - logq)).sum(axis=1)


def perplexity(nll: np.ndarray) -> float | None:
    return float(np.exp(nll.mean())) if nll.size else None
