"""GPTQ for mixture-of-experts models: every routed expert calibrated on the tokens routed to it,
and the experts the calibration text barely reaches still calibrated.

GPTQModel calibrates a decoder layer by replaying the layer's inputs once per group of modules
(attention, then the experts' gate/up, their down, the shared experts) with statistics hooks on
that group's Linear layers. An expert's Hessian therefore sums over the tokens the router sends
to it. An expert that receives fewer than `min_tokens` tokens in a replay ("starved") would get
a rank-deficient Hessian (GPTQModel's own answer is round-to-nearest below 0.5% of the tokens),
so during the replays in which the experts are calibrated it additionally runs on every token of
the batch: its Hessian gets statistics from the whole calibration set while the layer output,
which takes only its routed tokens' rows, is unchanged.

GPTQModel's own MoE options do not do this: ExpertsRoutingBypass sends every token to *every*
expert (no expert is calibrated on its routed distribution any more) and ExpertsRoutingOverride
changes top-k, hence the layer output the next layers calibrate on.

The decision for a replay uses the routed counts of the previous complete replay of the same
layer (the attention groups come first, so one exists); quantize_config.json records, per
expert, the tokens routed to it while it was calibrated and whether it was forced:

    "xvq_expert_calibration": {"min_tokens": 16, "experts": {"layer.N.expert.M":
                               {"routed_tokens": n, "forced": false}, ...}}

The model's MoE block cooperates through a class attribute `calibration_hook` (None outside
calibration), called as hook(block, chosen_expert_ids) -> experts to force; the block carries
its `layer_idx`.
"""
from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from xvq.errors import XvqError

log = logging.getLogger("xvq.gptq")

CONFIG_KEY = "xvq_expert_calibration"
# GPTQModel's default Fallback threshold (quantization/config.py Fallback.threshold "0.5%"):
# below it GPTQModel rounds a module to nearest. Forcing at or above it means no expert falls
# back to RTN because of routing.
GPTQMODEL_FALLBACK_FRACTION = 0.005
DEFAULT_GROUP_SIZE = 128
MIN_AUTO_GROUP_SIZE = 32


# ----------------------------------------------------------------------------------------------
# Group size
# ----------------------------------------------------------------------------------------------

def auto_group_size(widths: dict[str, int], preferred: int = DEFAULT_GROUP_SIZE) -> int:
    """`preferred`, halved until it divides every quantized input width (XVERSE-MoE-A4.2B: experts
    1728 and shared 3456 wide -> 64); -1 (one group per row) when no power of two down to 32 does."""
    g = preferred
    while g >= MIN_AUTO_GROUP_SIZE:
        if all(w % g == 0 for w in widths.values()):
            return g
        g //= 2
    return -1


# ----------------------------------------------------------------------------------------------
# Per-expert calibration
# ----------------------------------------------------------------------------------------------

def min_expert_tokens(n_tokens: int, min_tokens: int) -> int:
    """Tokens an expert must receive to be calibrated on its routed tokens alone."""
    return max(int(min_tokens), math.ceil(GPTQMODEL_FALLBACK_FRACTION * n_tokens))


def _calibrating(expert) -> bool:
    """GPTQModel swaps the modules of the group it calibrates for hooked wrappers
    (HookedLinear.forward_hook, or plain forward hooks)."""
    for lin in expert.children():
        if getattr(lin, "forward_hook", None) is not None or getattr(lin, "_forward_hooks", None):
            return True
    return False


@dataclass
class _Layer:
    pass_tokens: int = 0
    pass_counts: list[int] = field(default_factory=list)
    last_counts: list[int] | None = None               # routed counts of the last complete replay
    replay_routed: dict[int, int] = field(default_factory=dict)   # calibrated experts, this replay
    routed: dict[int, int] = field(default_factory=dict)          # expert -> tokens while calibrated
    forced: dict[int, bool] = field(default_factory=dict)


class ExpertCalibration:
    """The hook the MoE blocks call during GPTQ calibration. `n_tokens`: calibration tokens in
    one replay of the calibration set (replays are delimited by counting them)."""

    def __init__(self, n_tokens: int, min_tokens: int):
        self.n_tokens = n_tokens
        self.min_tokens = min_tokens
        self.layers: dict[int, _Layer] = {}

    def __call__(self, block, chosen) -> set[int]:
        import torch
        n_expert = len(block.experts)
        st = self.layers.setdefault(int(block.layer_idx), _Layer())
        counts = torch.bincount(chosen.reshape(-1).cpu(), minlength=n_expert).tolist()
        forced = set()
        for e in range(n_expert):
            if not _calibrating(block.experts[e]):
                continue
            st.replay_routed[e] = st.replay_routed.get(e, 0) + counts[e]
            if st.last_counts is not None and st.last_counts[e] < self.min_tokens:
                forced.add(e)
                st.forced[e] = True
        self._advance(int(block.layer_idx), st, counts, chosen.shape[0])
        return forced

    def _advance(self, layer: int, st: _Layer, counts: list[int], n: int) -> None:
        st.pass_counts = [a + b for a, b in zip(st.pass_counts or [0] * len(counts), counts)]
        st.pass_tokens += n
        if st.pass_tokens < self.n_tokens:
            return
        # a replay ended: the experts calibrated in it were calibrated on these routed counts
        # (the gate/up and the down replays route identically: the router precedes the experts)
        for e, n_routed in st.replay_routed.items():
            st.routed[e] = n_routed
            st.forced.setdefault(e, False)
            if n_routed < self.min_tokens and not st.forced[e]:
                log.warning("layer %d expert %d: %d routed calibration tokens and no earlier replay to "
                            "decide forcing from; GPTQModel may round it to nearest", layer, e, n_routed)
        st.last_counts, st.pass_counts, st.pass_tokens, st.replay_routed = st.pass_counts, [], 0, {}

    def record(self) -> dict:
        experts = {}
        for layer in sorted(self.layers):
            st = self.layers[layer]
            for e in sorted(st.routed):
                experts[f"layer.{layer}.expert.{e}"] = {"routed_tokens": int(st.routed[e]),
                                                        "forced": bool(st.forced.get(e, False))}
        return {"min_tokens": self.min_tokens, "experts": experts}

    def forced_experts(self) -> list[str]:
        return [k for k, v in self.record()["experts"].items() if v["forced"]]


def hooked_block_classes(model) -> set[type]:
    """Classes of the model's modules that take a calibration hook (MoE blocks)."""
    return {type(m) for m in model.modules() if "calibration_hook" in vars(type(m))}


@contextmanager
def expert_calibration(model, n_tokens: int, min_tokens: int) -> Iterator[ExpertCalibration | None]:
    """Installs the per-expert calibration on `model`'s MoE blocks for the duration; yields None
    for a model without any (dense)."""
    classes = hooked_block_classes(model)
    if not classes:
        yield None
        return
    calib = ExpertCalibration(n_tokens, min_tokens)
    for cls in classes:
        cls.calibration_hook = calib
    try:
        yield calib
    finally:
        for cls in classes:
            cls.calibration_hook = None


def record_in_quantize_config(folder: Path, calib: ExpertCalibration) -> dict:
    """Adds the per-expert record to quantize_config.json and config.json's quantization_config."""
    rec = calib.record()
    if not rec["experts"]:
        raise XvqError(f"{folder}: no MoE expert was calibrated; GPTQModel's module tree for this family "
                       f"does not name the experts — this is a bug in xvq, please report it")
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        target = data.get(key) if key else data
        if isinstance(target, dict):
            target[CONFIG_KEY] = rec
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return rec


def resolve_group_size(settings, widths: dict[str, int]):
    """Settings with a concrete group size: the user's (checked later), or the automatic one."""
    from dataclasses import replace
    if settings.group_size is not None:
        return settings
    g = auto_group_size(widths)
    if g != DEFAULT_GROUP_SIZE:
        odd = ", ".join(f"{m} ({w})" for m, w in widths.items() if w % DEFAULT_GROUP_SIZE)
        log.info("group size %d: %d does not divide the input width of %s (pass --group-size to choose)",
                 g, DEFAULT_GROUP_SIZE, odd)
    return replace(settings, group_size=g)
