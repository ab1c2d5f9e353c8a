"""llama.cpp's quantization types, transcribed once (llama.cpp exports none of this):

- every file type llama-quantize offers, the ggml type most of its weights get
  (llama_ftype_get_default_type) and whether llama.cpp refuses it without an importance matrix;
- what its quantizer writes for every tensor of a model (src/llama-quant.cpp,
  llama_tensor_get_type_impl + tensor_type_fallback), for sizes and the laptop fit without running it;
- the one rule for which types xvq gives an importance matrix.

Kept honest by the tests: files byte-identical to `llama-quantize`'s, and the per-tensor table
against its quantizer on every type (tests/test_moe.py). Bits per weight come from gguf-py's
GGML_QUANT_SIZES. Not covered: --pure, --tensor-type overrides, MXFP4_MOE/TQ* mixes, Falcon/GLM-5.

A file type is a mix: attn_v / ffn_down / output get more bits on some layers, then any type whose
block does not divide the row length (ne[0]) is demoted: XVERSE-MoE's expert down-projections have
rows of 1728 and the shared experts' of 3456, neither a multiple of 256, so their k-quants fall back
(Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, Q5_K -> Q5_1, IQ* -> IQ4_NL).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import gguf

from xvq.errors import XvqError
from xvq.llamacpp.gguf_file import type_bpw

QT = gguf.GGMLQuantizationType

# llama-quantize's file types (tools/quantize/quantize.cpp QUANT_OPTIONS): name -> (default ggml
# type of its weights, llama.cpp refuses it without an imatrix: IQ1/IQ2, IQ3_XXS, Q2_K_S).
FILE_TYPES = {
    "Q1_0": ("Q1_0", False), "Q2_0": ("Q2_0", False), "Q4_0": ("Q4_0", False), "Q4_1": ("Q4_1", False),
    "MXFP4_MOE": ("MXFP4", False), "Q5_0": ("Q5_0", False), "Q5_1": ("Q5_1", False),
    "IQ2_XXS": ("IQ2_XXS", True), "IQ2_XS": ("IQ2_XS", True), "IQ2_S": ("IQ2_XS", True), "IQ2_M": ("IQ2_S", True),
    "IQ1_S": ("IQ1_S", True), "IQ1_M": ("IQ1_M", True), "TQ1_0": ("TQ1_0", False), "TQ2_0": ("TQ2_0", False),
    "Q2_K": ("Q2_K", False), "Q2_K_S": ("Q2_K", True), "IQ3_XXS": ("IQ3_XXS", True), "IQ3_S": ("IQ3_S", False),
    "IQ3_M": ("IQ3_S", False), "IQ3_XS": ("IQ3_S", False), "Q3_K_S": ("Q3_K", False), "Q3_K_M": ("Q3_K", False),
    "Q3_K_L": ("Q3_K", False), "IQ4_NL": ("IQ4_NL", False), "IQ4_XS": ("IQ4_XS", False), "Q4_K_S": ("Q4_K", False),
    "Q4_K_M": ("Q4_K", False), "Q5_K_S": ("Q5_K", False), "Q5_K_M": ("Q5_K", False), "Q6_K": ("Q6_K", False),
    "Q8_0": ("Q8_0", False), "F16": ("F16", False), "BF16": ("BF16", False), "F32": ("F32", False),
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}
# tensor types that are not weights a user may ask for
_NOT_WEIGHT_TYPES = ("I8", "I16", "I32", "I64", "F64")


@dataclass(frozen=True)
class QuantType:
    name: str          # llama-quantize's name, e.g. Q4_K_M
    main: str          # ggml type of most weights
    needs_imatrix: bool = False   # llama.cpp refuses without one

    @property
    def ftype(self) -> int:
        """llama_ftype, asked of the installed llama.cpp (the enum has gaps that move)."""
        from xvq.llamacpp.runtime import ftype_value
        return ftype_value(self.name)

    @property
    def bpw(self) -> float:
        """Nominal bits per weight of the main tensor type."""
        return type_bpw(self.main)

    def gets_imatrix(self, auto: bool = True) -> bool:
        """xvq's rule: an explicit imatrix file applies to every type; `auto` measures and applies
        one below Q6_K (where llama.cpp's docs recommend it) and wherever llama.cpp demands one."""
        return not auto or self.needs_imatrix or self.bpw < type_bpw("Q6_K")


def quant_types() -> dict[str, QuantType]:
    return {n: QuantType(n, main, req) for n, (main, req) in FILE_TYPES.items()}


def parse_type(name: str) -> QuantType:
    """Case-insensitive; an unknown name lists the valid ones."""
    key = ALIASES.get(name.strip().upper(), name.strip().upper())
    if key not in FILE_TYPES:
        raise XvqError(f"--type {name}: unknown quantization type; use one of {', '.join(FILE_TYPES)}")
    return QuantType(key, *FILE_TYPES[key])


def parse_ggml_type(name: str | None, option: str) -> int | None:
    """--output-tensor-type / --token-embedding-type: a ggml tensor type name (q8_0, q6_k, f16...)."""
    if name is None:
        return None
    key = name.strip().upper()
    if key not in QT.__members__ or key in _NOT_WEIGHT_TYPES:
        valid = sorted(k for k in QT.__members__ if k not in _NOT_WEIGHT_TYPES)
        raise XvqError(f"{option} {name}: unknown tensor type; use one of {', '.join(valid)}")
    return int(QT[key])


# llama_ftype_get_default_type, for the per-tensor mixes
FTYPE_DEFAULT = {n: main for n, (main, _) in FILE_TYPES.items()
                 if n not in ("Q1_0", "Q2_0", "MXFP4_MOE", "TQ1_0", "TQ2_0")}

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
