"""GPTQ for mixture-of-experts models: every routed expert calibrated on the tokens routed to it,
and the experts the calibration text barely reaches calibrated on every token.

GPTQModel calibrates a decoder layer by replaying the layer's cached inputs once per group of
modules (attention q/k/v, o, the experts' gate/up, their down, the shared experts) with
statistics hooks on that group's Linear layers; the replays of the attention groups stop before
the MoE block. An expert's Hessian therefore sums over the tokens the router sends to it. One
that receives fewer than `min_tokens` in a replay ("starved") gets a rank-deficient Hessian,
and GPTQModel's own answer (its default Fallback) is round-to-nearest below 0.5% of the tokens.

Here, while a group of experts is calibrated, the MoE block's inputs of the replay are kept; on
the replay's last batch the routed counts are complete, and each starved expert runs on the
replay's tokens that were not routed to it, so its statistics cover every calibration token
once. The outputs of those runs are discarded: the layer output is the model's own.

GPTQModel 7.6's own MoE options do not do this: MoEConfig(ExpertsRoutingBypass) sends every
token to *every* expert (no expert is calibrated on its routed distribution any more) and
ExpertsRoutingOverride changes top-k, hence the layer output the next layers calibrate on.

quantize_config.json (and config.json's quantization_config) record, per expert, the tokens
routed to it in the replay that calibrated it and whether it was forced:

    "xvq_expert_calibration": {"min_tokens": 2560, "n_experts": 64 x layers, "n_forced": k,
                               "forced_share": k / n_experts, "experts": {"layer.N.expert.M":
                               {"routed_tokens": n, "forced": false}, ...}}

The model's MoE block cooperates through an attribute `calibration_hook` (the class's None outside
calibration), called as hook(block, x, chosen_expert_ids) after its routed experts ran (also
when GPTQModel cut the forward short); the block carries its `layer_idx`. The kept inputs of one
replay take n_tokens x hidden values (XVERSE-MoE-A4.2B, 128k tokens: 0.7 GB in bf16).
"""
from __future__ import annotations

import json
import logging
import math
import threading
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
    1728 and shared 3456 wide -> 64); `preferred` itself when no power of two down to 32 does,
    so the usual "does not divide" error names the widths."""
    g = preferred
    while g >= MIN_AUTO_GROUP_SIZE:
        if all(w % g == 0 for w in widths.values()):
            return g
        g //= 2
    return preferred


# ----------------------------------------------------------------------------------------------
# Per-expert calibration
# ----------------------------------------------------------------------------------------------

def min_expert_tokens(n_tokens: int, min_tokens: int | None, hidden_size: int) -> int:
    """Routed tokens below which an expert is calibrated on every token: `min_tokens`, by default
    the hidden size (an expert's gate/up Hessian is hidden x hidden: with fewer tokens it is
    rank-deficient, and bench/gptq_moe.py measures such experts at 1.4-2x RTN's held-out error
    when calibrated on their routed tokens alone, ~1x when forced); never below GPTQModel's
    fallback fraction, under which it would round the expert to nearest instead."""
    floor = math.ceil(GPTQMODEL_FALLBACK_FRACTION * n_tokens)
    return max(int(hidden_size if min_tokens is None else min_tokens), floor)


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
    stored: list = field(default_factory=list)      # (x, chosen) of this replay while experts calibrate
    routed: dict[int, int] = field(default_factory=dict)      # expert -> tokens while calibrated
    forced: dict[int, bool] = field(default_factory=dict)


class ExpertCalibration:
    """The hook the MoE blocks call during GPTQ calibration, after their routed experts ran.

    While a block's experts are being calibrated, it keeps the block's inputs of the replay; on
    the replay's last batch (replays are delimited by counting `n_tokens`, the calibration
    tokens of one replay) the routed counts are complete, and every calibrated expert with
    fewer than `min_tokens` runs on the replay's tokens that were not routed to it, so its
    statistics cover each calibration token once. Outputs are discarded."""

    def __init__(self, n_tokens: int, min_tokens: int, chunk_tokens: int = 4096):
        self.n_tokens = n_tokens
        self.min_tokens = min_tokens
        self.chunk_tokens = chunk_tokens
        self.layers: dict[int, _Layer] = {}
        self.lock = threading.Lock()   # GPTQModel may replay batches from worker threads

    def __call__(self, block, x, chosen) -> None:
        with self.lock:
            self._observe(block, x, chosen)

    def _observe(self, block, x, chosen) -> None:
        import torch
        n_expert = len(block.experts)
        st = self.layers.setdefault(int(block.layer_idx), _Layer())
        counts = torch.bincount(chosen.reshape(-1).cpu(), minlength=n_expert).tolist()
        st.pass_counts = [a + b for a, b in zip(st.pass_counts or [0] * n_expert, counts)]
        st.pass_tokens += int(chosen.shape[0])
        calibrating = [e for e in range(n_expert) if _calibrating(block.experts[e])]
        if calibrating:
            st.stored.append((x.detach(), chosen.detach()))
        if st.pass_tokens < self.n_tokens:
            return
        replay, stored = st.pass_counts, st.stored
        st.pass_counts, st.pass_tokens, st.stored = [], 0, []
        for e in calibrating:
            st.routed[e] = replay[e]   # the gate/up and down replays route alike: the router precedes them
            starved = replay[e] < self.min_tokens
            st.forced[e] = st.forced.get(e, False) or starved
            if starved:
                self._force(block.experts[e], e, stored)

    def _force(self, expert, e: int, stored) -> None:
        import torch
        with torch.no_grad():
            for x, chosen in stored:
                rest = x[~(chosen == e).any(dim=-1)]
                for k in range(0, rest.shape[0], self.chunk_tokens):
                    run_past_early_stop(expert, rest[k:k + self.chunk_tokens])

    def record(self) -> dict:
        partial = [layer for layer, st in self.layers.items() if st.pass_tokens]
        if partial:
            raise XvqError(f"GPTQ calibration replays of layer(s) {partial} did not add up to the {self.n_tokens} "
                           f"calibration tokens; the per-expert record would be wrong — this is a bug in xvq, "
                           f"please report it")
        experts = {}
        for layer in sorted(self.layers):
            st = self.layers[layer]
            for e in sorted(st.routed):
                experts[f"layer.{layer}.expert.{e}"] = {"routed_tokens": int(st.routed[e]),
                                                        "forced": bool(st.forced.get(e, False))}
        n_forced = sum(v["forced"] for v in experts.values())
        return {"min_tokens": self.min_tokens, "n_experts": len(experts), "n_forced": n_forced,
                "forced_share": n_forced / len(experts) if experts else 0.0, "experts": experts}

    def forced_experts(self) -> list[str]:
        return [k for k, v in self.record()["experts"].items() if v["forced"]]


def run_past_early_stop(module, x) -> None:
    """module(x), ignoring GPTQModel's StopForward: the last hooked module of a group raises it
    after recording its statistics, to cut the layer's forward short; here every stored batch
    must still be fed, and the layer's own forward goes on (or stops) as GPTQModel decides."""
    try:
        module(x)
    except Exception as e:
        if type(e).__name__ != "StopForward":
            raise


def hooked_blocks(model) -> list:
    """The model's modules that take a calibration hook (MoE blocks declare `calibration_hook`)."""
    return [m for m in model.modules() if "calibration_hook" in vars(type(m))]


@contextmanager
def expert_calibration(model, n_tokens: int, min_tokens: int) -> Iterator[ExpertCalibration | None]:
    """Installs the per-expert calibration on `model`'s MoE blocks (these instances only, so
    another model in the process is untouched) for the duration; yields None for a dense model."""
    blocks = hooked_blocks(model)
    if not blocks:
        yield None
        return
    calib = ExpertCalibration(n_tokens, min_tokens)
    for block in blocks:
        block.calibration_hook = calib
    try:
        yield calib
    finally:
        for block in blocks:
            del block.calibration_hook   # back to the class's None


def record_in_quantize_config(folder: Path, calib: ExpertCalibration, quant_log: list[dict]) -> dict:
    """Adds the per-expert record to quantize_config.json and config.json's quantization_config,
    and names the quantized modules of a decoder layer for transformers' loader
    (`modules_in_block_to_quantize`): it would otherwise expect every Linear of a layer in
    GPTQ form, the router too, which GPTQ leaves in floating point."""
    rec = calib.record()
    if not rec["experts"]:
        raise XvqError(f"{folder}: no MoE expert was calibrated; GPTQModel's module tree for this family "
                       f"does not name the experts — this is a bug in xvq, please report it")
    quantized = sorted({str(e["module"]) for e in quant_log if e.get("module")})
    forced = calib.forced_experts()
    log.info("MoE calibration: %d of %d experts had fewer than %d routed calibration tokens and were "
             "calibrated on every token%s", len(forced), len(rec["experts"]), calib.min_tokens,
             f" ({', '.join(forced[:8])}{', ...' if len(forced) > 8 else ''})" if forced else "")
    for name, key in (("quantize_config.json", None), ("config.json", "quantization_config")):
        path = folder / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        target = data.get(key) if key else data
        if isinstance(target, dict):
            target[CONFIG_KEY] = rec
            if key:
                target["modules_in_block_to_quantize"] = [quantized]
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return rec


def resolve_group_size(settings, widths: dict[str, int]):
    """Settings with a concrete group size: the user's (checked later), or the automatic one."""
    from dataclasses import replace
    if settings.group_size is not None:
        return settings
    g = auto_group_size(widths)
    if g != DEFAULT_GROUP_SIZE:
        odd = ", ".join(map(str, sorted({w for w in widths.values() if w % DEFAULT_GROUP_SIZE})))
        log.info("no --group-size given: using %d, as %d does not divide the input width(s) %s "
                 "(MoE experts); pass --group-size to choose", g, DEFAULT_GROUP_SIZE, odd)
    return replace(settings, group_size=g)
