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

from xvq.logits import full_kld, log_sum_exp  # noqa: F401  (validate's names, kept)

DEFAULT_TOP_K = 128
FULL_SAMPLE_FLOATS = 1 << 22        # full reference rows kept for the top-k-vs-full check (16 MiB)


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

    def slice(self, a: int, b: int) -> "RefRows":
        return RefRows(self.ids[a:b], self.top[a:b], self.lse[a:b], self.nll[a:b])

    @staticmethod
    def concat(parts: list["RefRows"]) -> "RefRows":
        return RefRows(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("ids", "top", "lse", "nll")))


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
    rows = np.arange(len(targets))
    top = logits.argmax(axis=1)
    lse = log_sum_exp(logits, logits[rows, top])
    nll = lse - logits[rows, targets]
    logq = np.take_along_axis(logits, ref.ids, 1).astype(np.float64) - lse[:, None]
    kld = kld_topk(ref, logq, exact=ref.ids.shape[1] >= n_vocab)
    return ArtifactRows(nll, kld, top == ref.ids[:, 0])


MIN_BLOCK_FLOATS = 1 << 20     # smaller blocks cost more in thread hand-offs than they save


def in_row_blocks(fn, n_rows: int, pool, n_blocks: int, row_len: int = 1 << 20) -> list:
    """fn(a, b) over contiguous row blocks, in the pool when given (numpy releases the GIL, so
    the blocks run on separate cores, as llama-perplexity's worker threads do); results in order.
    Blocks hold at least MIN_BLOCK_FLOATS logits: a small vocabulary runs in one block."""
    n_blocks = max(1, min(n_blocks, n_rows * row_len // MIN_BLOCK_FLOATS))
    step = max(1, -(-n_rows // n_blocks))
    spans = [(a, min(a + step, n_rows)) for a in range(0, n_rows, step)]
    if pool is None or len(spans) == 1:
        return [fn(a, b) for a, b in spans]
    return list(pool.map(lambda ab: fn(*ab), spans))


def perplexity(nll: np.ndarray) -> float | None:
    return float(np.exp(nll.mean())) if nll.size else None
