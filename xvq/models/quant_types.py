"""What llama.cpp's quantizer really writes for every tensor of a model, without running it.

A llama.cpp file type (Q4_K_M, ...) is a mix: src/llama-quant.cpp picks a type per tensor
(llama_tensor_get_type_impl: attn_v / ffn_down / output get more bits on some layers), then
`tensor_type_fallback` demotes any type whose block does not divide the row length (ne[0]):
XVERSE-MoE's expert down-projections have rows of 1728 and the shared experts' of 3456, neither
a multiple of 256, so their k-quants fall back (Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0,
Q5_K -> Q5_1, IQ* -> IQ4_NL). This module transcribes those rules (llama-cpp-python 0.3.36's
vendored llama.cpp; tests/test_moe.py checks them against its quantizer) for sizes and the
laptop fit: `effective_tensor_types(family, "Q4_K_M")`.

Not covered: --pure, --tensor-type overrides, MXFP4_MOE/TQ*, and the Falcon/GLM-5 special cases.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf
import numpy as np

from xvq.errors import XvqError

QT = gguf.GGMLQuantizationType

# llama_ftype_get_default_type
FTYPE_DEFAULT = {
    "F32": "F32", "F16": "F16", "BF16": "BF16", "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
    "Q8_0": "Q8_0", "Q2_K_S": "Q2_K", "Q2_K": "Q2_K", "IQ3_XS": "IQ3_S", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS", "IQ2_M": "IQ2_S", "IQ3_XXS": "IQ3_XXS",
    "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
}

# tensor_type_fallback: a 256-block type whose block does not divide the row -> a 32-block type
FALLBACK = {**dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
            **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
            "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}

IQ2_MIXES = ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M")


def block_size(qtype: str) -> int:
    return gguf.GGML_QUANT_SIZES[QT[qtype]][0]


def is_quantized(qtype: str) -> bool:
    return qtype not in ("F32", "F16", "BF16", "F64")


def fallback_type(ncols: int, qtype: str) -> str:
    """tensor_type_fallback: what `qtype` becomes for rows of `ncols` values."""
    if ncols % block_size(qtype) == 0:
        return qtype
    new = FALLBACK.get(qtype)
    if new is None:
        if block_size(qtype) > 32:
            raise XvqError(f"llama.cpp defines no fallback for {qtype} (rows of {ncols})")
        new = qtype
    return new if ncols % block_size(new) == 0 else "F16"


def category(name: str) -> str:
    """tensor_get_category (order matters: ffn_gate_inp counts as ffn_gate, never quantized)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                     ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization, for the tensors LLaMA-shaped models have."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name and name != "position_embd.weight")


def gguf_order(name: str) -> tuple[int, str]:
    """llama.cpp's weight_name_comparer: the order its quantizer walks (and counts) tensors."""
    m = re.match(r"blk\.(\d+)\.", name)
    return (int(m.group(1)) if m else -1, name)


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


@dataclass
class _State:
    """quantize_state_impl: model facts and the running counters."""
    n_layer: int
    n_expert: int
    n_gqa: int
    has_imatrix: bool
    tied: bool
    is_70b: bool
    n_attention_wv: int
    counters: dict = field(default_factory=lambda: dict.fromkeys(("attn_v", "ffn_down", "ffn_gate", "ffn_up"), 0))

    def layer_of(self, cat: str, name: str) -> int:
        """layer_info: MoE models read the block number from the name, others count tensors."""
        if self.n_expert > 1:
            return int(re.match(r"blk\.(\d+)\.", name).group(1))
        return self.counters[cat]


def _mix_type(s: _State, t: str, name: str, ncols: int, ftype: str, cat: str) -> str:
    """llama_tensor_get_type_impl (non-Falcon, no --output-tensor-type/--token-embedding-type)."""
    n = s.n_layer
    if cat == "output" or (s.tied and cat == "token_embd"):
        if ncols % block_size(t):
            return "Q8_0"
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return t if t == "Q8_0" else "Q6_K"
    if cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return "Q2_K"
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return "IQ3_S"
        if ftype in ("TQ1_0", "TQ2_0"):
            return "Q4_K"
        return t
    attn_v_like = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    if ftype in IQ2_MIXES:
        if attn_v_like:
            t = "Q4_K" if (s.n_gqa >= 4 or s.n_expert >= 4) else ("IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K")
            s.counters["attn_v"] += 1
        elif s.n_expert == 8 and cat == "attn_k":
            t = "Q4_K"
        elif cat == "ffn_down":
            if s.counters["ffn_down"] < n // 8:
                t = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
            s.counters["ffn_down"] += 1
        elif cat == "attn_output":
            if s.n_expert == 8:
                t = "Q5_K"
            elif ftype in ("IQ1_S", "IQ1_M"):
                t = "IQ2_XXS"
            elif ftype in ("IQ2_S", "IQ2_M"):
                t = "IQ3_S"
        return t
    if attn_v_like:
        i = s.counters["attn_v"]
        if ftype == "Q2_K":
            t = "Q4_K" if s.n_gqa >= 4 else "Q3_K"
        elif ftype == "Q2_K_S" and s.n_gqa >= 4:
            t = "Q4_K"
        elif ftype == "IQ3_XXS":
            t = "Q4_K" if s.n_gqa >= 4 else ("IQ3_S" if not s.has_imatrix else "IQ3_XXS")
        elif ftype in ("IQ3_XS", "IQ3_S") and s.n_gqa >= 4:
            t = "Q4_K"
        elif ftype == "IQ3_M":
            t = "Q4_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i < 2 else "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype in ("IQ4_NL", "IQ4_XS") and s.n_gqa >= 4:
            t = "Q5_K"
        elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, s.n_attention_wv):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i < 4:
            t = "Q5_K"
        if s.is_70b and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"
        if s.n_expert == 8:
            t = "Q8_0"
        s.counters["attn_v"] += 1
    elif cat == "attn_k":
        if s.n_expert == 8:
            t = "Q8_0"
        elif ftype == "IQ3_XS":
            t = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            t = "IQ2_S"
    elif cat == "attn_q":
        if ftype == "IQ3_XS":
            t = "IQ3_XXS"
        elif ftype == "IQ3_XXS":
            t = "IQ2_S"
    elif cat == "ffn_down":
        i = s.layer_of(cat, name)
        if ftype == "Q2_K":
            t = "Q3_K"
        elif ftype == "Q2_K_S":
            if i < n // 8:
                t = "Q4_K"
        elif ftype == "IQ3_XXS" and not s.has_imatrix:
            t = "Q4_K" if i < n // 8 else "Q3_K"
        elif ftype == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif ftype == "IQ3_M" and (i < n // 8 or (s.n_expert == 8 and use_more_bits(i, n))):
            t = "Q4_K"
        elif ftype == "Q3_K_L":
            t = "Q5_K"
        elif ftype == "Q4_K_M":
            if use_more_bits(i, n):
                t = "Q6_K"
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not s.has_imatrix:
            t = "Q5_K"
        elif ftype == "Q5_K_M" and use_more_bits(i, n):
            t = "Q6_K"
        elif ftype == "Q4_K_S" and i < n // 8:
            t = "Q5_K"
        elif ftype in ("Q4_0", "Q5_0") and s.has_imatrix and i < n // 8:
            t = "Q4_1" if ftype == "Q4_0" else "Q5_1"
        s.counters["ffn_down"] += 1
    elif cat == "attn_output":
        if s.n_expert == 8:
            if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                         "IQ3_M", "IQ4_XS"):
                t = "Q5_K"
        else:
            t = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype, t)
    elif cat == "attn_qkv":
        t = {"Q3_K_M": "Q4_K", "Q3_K_L": "Q4_K", "IQ3_M": "Q4_K", "Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(ftype, t)
    elif cat in ("ffn_gate", "ffn_up"):
        i = s.layer_of(cat, name)
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            t = "IQ3_XXS"
        s.counters[cat] += 1
    return t


def tensor_types(tensors: dict[str, tuple[tuple[int, ...], str]], ftype: str, *, n_layer: int, n_expert: int = 0,
                 n_gqa: int = 1, has_imatrix: bool = False, is_70b: bool = False) -> dict[str, str]:
    """GGUF tensor name -> the ggml type llama.cpp writes for file type `ftype`.
    `tensors`: name -> (shape rows-first as numpy/torch, type in the source GGUF)."""
    ftype = ftype.upper()
    if ftype not in FTYPE_DEFAULT:
        raise XvqError(f"file type {ftype}: not modelled; use one of {', '.join(FTYPE_DEFAULT)}")
    default = FTYPE_DEFAULT[ftype]
    names = sorted(tensors, key=gguf_order)
    s = _State(n_layer=n_layer, n_expert=max(1, n_expert), n_gqa=n_gqa, has_imatrix=has_imatrix,
               tied="output.weight" not in tensors, is_70b=is_70b,
               n_attention_wv=sum(category(n) in ("attn_v", "attn_qkv", "attn_kv_b") for n in names))
    out = {}
    for name in names:
        shape, src_type = tensors[name]
        if not allows_quantization(name, shape):
            out[name] = src_type
            continue
        t = default
        if is_quantized(default):
            t = fallback_type(shape[-1], _mix_type(s, default, name, shape[-1], ftype, category(name)))
        out[name] = t
    return out


def family_tensors(fam, source_outtype: str = "f16") -> dict[str, tuple[tuple[int, ...], str]]:
    """The GGUF tensors `xvq convert` writes for a family's config (names, shapes, types), from
    the config alone: the family maps its expected checkpoint shapes as it would real tensors."""
    from xvq.convert.writer import tensor_type
    from xvq.models.base import SourceTensor

    def unreadable(sel):
        raise RuntimeError("shape-only source")
    sources = {n: SourceTensor(n, tuple(shape), "F16", unreadable) for n, shape in fam.expected_shapes().items()}
    return {t.name: (tuple(t.shape), tensor_type(t, source_outtype).name) for t in fam.gguf_tensors(sources)}


def effective_tensor_types(fam, ftype: str, *, has_imatrix: bool = False,
                           source_outtype: str = "f16") -> dict[str, str]:
    """For a Family: GGUF tensor name -> ggml type after `llama-quantize <ftype>`."""
    hp = fam.hp
    is_70b = fam.gguf_arch == "llama" and hp.n_layer == 80 and hp.n_head != hp.n_head_kv
    return tensor_types(family_tensors(fam, source_outtype), ftype, n_layer=hp.n_layer, n_expert=hp.n_expert,
                        n_gqa=hp.n_head // hp.n_head_kv, has_imatrix=has_imatrix, is_70b=is_70b)


def pattern_summary(types: dict[str, str]) -> dict[str, dict[str, int]]:
    """`blk.*.ffn_down_exps.weight` -> {type: how many layers}: the per-kind view of a mix."""
    out: dict[str, dict[str, int]] = {}
    for name, t in types.items():
        key = re.sub(r"^blk\.\d+\.", "blk.*.", name)
        out.setdefault(key, {})
        out[key][t] = out[key].get(t, 0) + 1
    return out


def quantized_bytes(fam, ftype: str, **kw) -> int:
    """Size of the tensor data of `fam` quantized to `ftype` (what a laptop must hold)."""
    shapes = family_tensors(fam)
    types = effective_tensor_types(fam, ftype, **kw)
    total = 0
    for name, (shape, _) in shapes.items():
        block, size = gguf.GGML_QUANT_SIZES[QT[types[name]]]
        total += int(np.prod(shape)) // block * size
    return total
