"""The reference pass, run once per (reference, token windows, k) and cached on disk, so ten
artifacts cost one reference pass. The cache holds, per scored position, the reference's top-k
logits and ids, the log-sum-exp of the full row and the NLL of the target token; plus full
log-probabilities for a leading sample of positions (the top-k-vs-full KLD check)."""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xvq.fsio import atomic_output
from xvq.llamacpp import default_threads
from xvq.validate.metrics import FULL_SAMPLE_FLOATS, RefRows, in_row_blocks, reference_rows
from xvq.validate.windows import Windows

CACHE_VERSION = 1


@dataclass
class Reference:
    rows: RefRows
    n_vocab: int
    full_logp: np.ndarray       # [n_full, n_vocab] float32 log-probs of the first n_full positions
    source: str
    cache_file: Path | None = None

    @property
    def k(self) -> int:
        return int(self.rows.ids.shape[1])

    def slice(self, a: int, b: int) -> RefRows:
        return self.rows.slice(a, b)


def identity(path: Path, cache: Path | None = None) -> str:
    """Path plus its files' contents (sha256, cached by xvq.identity): a changed checkpoint gets a
    new cache entry even when its mtimes were kept."""
    from xvq.identity import file_hash
    path = Path(path).resolve()
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    parts = [str(path)] + [f"{f.name}:{file_hash(f, cache)}" for f in files if f.is_file()]
    return "|".join(parts)


def cache_key(source_id: str, windows: Windows, k: int) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{source_id}|ctx={windows.ctx}|k={k}".encode())
    h.update(np.ascontiguousarray(windows.tokens).tobytes())
    return h.hexdigest()[:20]


def load_cached(path: Path, source: str) -> Reference | None:
    if not path.is_file():
        return None
    try:
        z = np.load(path)
        rows = RefRows(z["ids"], z["top"], z["lse"], z["nll"])
        return Reference(rows, int(z["n_vocab"]), z["full_logp"], source, path)
    except Exception:       # a damaged cache is recomputed, never trusted
        return None


def compute(scorer, windows: Windows, k: int, source: str, progress: bool = True) -> Reference:
    targets = windows.targets()
    n_full = max(1, min(windows.n_windows * windows.per_window, FULL_SAMPLE_FLOATS // scorer.n_vocab))
    parts, full = [], []
    n_seen = 0
    bar = tqdm(total=windows.n_windows, desc=f"reference {Path(source).name}", unit="win",
               disable=not progress, leave=False)
    workers = default_threads()
    with bar, ThreadPoolExecutor(workers) as pool:
        for i, logits in enumerate(scorer.logits(windows.tokens)):
            tg = targets[i]
            parts.append(RefRows.concat(in_row_blocks(lambda a, b: reference_rows(logits[a:b], tg[a:b], k),
                                                      len(tg), pool, workers, logits.shape[1])))
            if n_seen < n_full:
                take = logits[: n_full - n_seen]
                lse = parts[-1].lse[: len(take)]
                full.append((take.astype(np.float64) - lse[:, None]).astype(np.float32))
                n_seen += len(take)
            bar.update()
    rows = RefRows.concat(parts)
    full_logp = np.concatenate(full) if full else np.zeros((0, scorer.n_vocab), np.float32)
    return Reference(rows, scorer.n_vocab, full_logp, source)


def save(ref: Reference, path: Path) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, ids=ref.rows.ids, top=ref.rows.top, lse=ref.rows.lse, nll=ref.rows.nll,
                     n_vocab=np.int64(ref.n_vocab), full_logp=ref.full_logp)
    ref.cache_file = path


def reference_for(make_scorer, source: Path, windows: Windows, k: int, cache_dir: Path | None,
                  progress: bool = True) -> Reference:
    """Cached reference statistics; `make_scorer()` is only called on a cache miss."""
    path = (cache_dir / f"reference-{cache_key(identity(source, cache_dir / 'identity-cache.json'), windows, k)}.npz"
            if cache_dir else None)
    if path is not None:
        hit = load_cached(path, str(source))
        if hit is not None:
            return hit
    scorer = make_scorer()
    try:
        ref = compute(scorer, windows, k, str(source), progress)
    finally:
        scorer.close()
    if path is not None:
        save(ref, path)
        from xvq.identity import flush
        flush()   # the reference checkpoint's hashes, beside the cache they key
    return ref
