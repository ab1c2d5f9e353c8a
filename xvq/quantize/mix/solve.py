"""The choice: minimum predicted KLD (sum of gain x error over tensors, small perturbations add)
under the byte budget."""
from __future__ import annotations

import numpy as np

from xvq.quantize.mix.candidates import TensorChoice, padded


def solve(tensors: list[TensorChoice], budget: int, units: int = 20000) -> dict[str, str]:
    """Minimum predicted KLD with sum of padded tensor bytes <= budget (tensor data only): a
    dynamic programme over the budget in `units` steps, each tensor's sizes rounded up to whole
    steps (so every solution it finds fits), then filled with single upgrades in exact bytes."""
    choice = {c.name: min(c.options, key=c.options.get) for c in tensors}
    fixed = [c for c in tensors if not c.quantizable]
    q = [c for c in tensors if c.quantizable]
    left = budget - sum(padded(c.options[choice[c.name]]) for c in fixed)
    if not q or left < sum(padded(min(c.options.values())) for c in q):
        return choice
    step = max(1, -(-left // units))
    n = left // step
    inf = np.inf
    dp = np.zeros(n + 1)                       # best predicted KLD using at most b steps
    picks = []
    for c in q:
        opts = list(c.options)
        w = [-(-padded(c.options[t]) // step) for t in opts]
        v = [c.predicted(t) for t in opts]
        new = np.full(n + 1, inf)
        arg = np.zeros(n + 1, np.int8)
        for i, (wi, vi) in enumerate(zip(w, v)):
            if wi > n:
                continue
            cand = np.full(n + 1, inf)
            cand[wi:] = dp[:n + 1 - wi] + vi
            better = cand < new
            new[better], arg[better] = cand[better], i
        dp = new
        picks.append((c, opts, w, arg))
    if not np.isfinite(dp[n]):                # the rounding up left no room: the cheapest types
        return choice
    b = n
    for c, opts, w, arg in reversed(picks):   # walk back the choices
        i = int(arg[b])
        choice[c.name] = opts[i]
        b -= w[i]
    by_name = {c.name: c for c in tensors}
    used = sum(padded(by_name[nm].options[t]) for nm, t in choice.items())
    # fill what the rounding left with the single best upgrades
    while True:
        best = None
        for c in q:
            n, cur = c.name, choice[c.name]
            for t in c.options:
                db = padded(c.options[t]) - padded(c.options[cur])
                dk = c.predicted(cur) - c.predicted(t)
                if dk > 0 and db > 0 and used + db <= budget and (best is None or dk > best[0]):
                    best = (dk, n, t, db)
        if best is None:
            break
        _, n, t, db = best
        choice[n], used = t, used + db
    return choice
