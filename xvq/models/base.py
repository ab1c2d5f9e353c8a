"""What a model family declares, once, for every stage.

A family module subclasses `Family`, fills in the class attributes and registers itself with
`@register`. Stage code asks `family_for(config)` and reads the answers; it never names a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from xvq.errors import XvqError

# A reader of rows of a source tensor, viewed as 2-D (prod(shape[:-1]), shape[-1]); returns float32.
RowReader = Callable[[Any], np.ndarray]


@dataclass
class SourceTensor:
    """One tensor of a checkpoint, not loaded: shape, dtype and a row reader."""
    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: RowReader
    file: str = ""
    # Rows in the stored dtype (float32/float16/float64 as is, bfloat16 as its uint16 bits), for
    # bit-exact arithmetic (delta merging); None where the reader cannot provide them.
    raw_rows: RowReader | None = None

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    def load(self) -> np.ndarray:
        return self.rows(slice(0, self.n_rows)).reshape(self.shape)


@dataclass
class OutTensor:
    """One GGUF tensor to write: its name, its shape (rows-first, as torch/numpy) and a row reader."""
    name: str
    shape: tuple[int, ...]
    rows: RowReader
    sources: list[str] = field(default_factory=list)
    # The same rows in the source's stored dtype (SourceTensor.raw_rows) when the mapping only
    # reorders rows, so the writer can go bf16 -> f16 (or f16 -> f16) without a float32 detour.
    raw_rows: RowReader | None = None
    raw_dtype: str | None = None

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1


def rope_permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half q/k layout into llama.cpp's interleaved (NORM) rope.
    Same as llama.cpp's `LlamaModel.permute`: reshape(n_head, 2, hd/2).swapaxes(1, 2)."""
    idx = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2)
    return idx.swapaxes(1, 2).reshape(-1)


def reordered(rows: RowReader, order: np.ndarray | None) -> RowReader:
    """`rows` with row i of the result read from row order[i] (None: unchanged)."""
    if order is None:
        return rows

    def read(sel):
        return rows(order[sel])
    return read


@dataclass
class Hparams:
    """The shapes and constants of one checkpoint, normalised from its config.json."""
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tie_embeddings: bool = False
    n_expert: int = 0
    n_expert_used: int = 0
    n_shared_expert: int = 0
    n_ff_exp: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class Family:
    """Base declaration. Subclasses override class attributes; methods rarely."""
    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]] = ()   # config.json "architectures" accepted
    model_types: ClassVar[tuple[str, ...]] = ()     # config.json "model_type" accepted
    gguf_arch: ClassVar[str]                        # llama.cpp architecture name
    vocab_kind: ClassVar[str] = "auto"              # "bpe" (tokenizer.json), "spm" (tokenizer.model), "auto"
    default_rms_eps: ClassVar[float] = 1e-6
    default_rope_theta: ClassVar[float] = 10000.0
    chat_template: ClassVar[str | None] = None      # Jinja template for *-Chat checkpoints
    chat_template_names: ClassVar[dict[str, str]] = {}  # --chat-template NAME -> template
    license: ClassVar[str | None] = None            # SPDX-style id for general.license and cards
    license_name: ClassVar[str | None] = None       # the model licence's own name, when not an SPDX one
    license_link: ClassVar[str | None] = None
    languages: ClassVar[tuple[str, ...]] = ("en",)  # model-card `language:` list
    # Ollama Modelfile: prompt template (Go template syntax) and stop strings
    ollama_template: ClassVar[str] = "{{ .Prompt }}"
    stop_strings: ClassVar[tuple[str, ...]] = ()
    gptq_base: ClassVar[str] = "llama"              # GPTQModel definition to quantize through
    gptq_module_tree: ClassVar[list | None] = None  # its module_tree, when the family's differs
    # How a GPTQ folder declares itself so that plain transformers loads it: None keeps the
    # source's config; "llama" rewrites it as LlamaForCausalLM (the weights are LLaMA's as they
    # are); "remote-code" ships xvq's modeling file for transformers 5 and points auto_map at it.
    gptq_loads_as: ClassVar[str | None] = None
    gptq_definition_attrs: ClassVar[dict] = {}      # further class attributes of that definition
    # "remote-code" folders: xvq's modeling files (in xvq/models -> name in the folder) and the
    # auto_map that points transformers at them
    gptq_remote_code: ClassVar[dict[str, str]] = {}
    gptq_auto_map: ClassVar[dict[str, str]] = {}
    rope_permute_qk: ClassVar[bool] = True          # HF rotate-half -> llama.cpp NORM rope

    def __init__(self, config: dict, source: str = "config.json"):
        self.config = config
        self.source = source  # the config's file, for one-line errors
        self.hp = self.hparams(config)

    # --- recognising a checkpoint ---
    @classmethod
    def accepts(cls, config: dict) -> bool:
        archs = set(config.get("architectures") or [])
        return bool(archs & set(cls.architectures)) or config.get("model_type") in cls.model_types

    # --- shapes ---
    def hparams(self, c: dict) -> Hparams:
        n_head = c["num_attention_heads"]
        return Hparams(
            n_layer=c["num_hidden_layers"], n_embd=c["hidden_size"], n_head=n_head,
            n_head_kv=c.get("num_key_value_heads") or n_head, n_ff=c["intermediate_size"],
            n_vocab=c["vocab_size"], n_ctx=c.get("max_position_embeddings", 4096),
            rope_theta=float(rope_theta_of(c) or self.default_rope_theta),
            rms_eps=float(c.get("rms_norm_eps", self.default_rms_eps)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape, for checking a checkpoint against its config."""
        hp = self.hp
        hd = hp.head_dim
        shapes = {"model.embed_tokens.weight": (hp.n_vocab, hp.n_embd), "model.norm.weight": (hp.n_embd,)}
        if not hp.tie_embeddings:
            shapes["lm_head.weight"] = (hp.n_vocab, hp.n_embd)
        for i in range(hp.n_layer):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (hp.n_embd,), p + "post_attention_layernorm.weight": (hp.n_embd,),
                p + "self_attn.q_proj.weight": (hp.n_head * hd, hp.n_embd),
                p + "self_attn.k_proj.weight": (hp.n_head_kv * hd, hp.n_embd),
                p + "self_attn.v_proj.weight": (hp.n_head_kv * hd, hp.n_embd),
                p + "self_attn.o_proj.weight": (hp.n_embd, hp.n_head * hd),
            }
            shapes |= self.ffn_shapes(i)
        return shapes

    def ffn_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        hp, p = self.hp, f"model.layers.{i}.mlp."
        return {p + "gate_proj.weight": (hp.n_ff, hp.n_embd), p + "up_proj.weight": (hp.n_ff, hp.n_embd),
                p + "down_proj.weight": (hp.n_embd, hp.n_ff)}

    # --- GGUF ---
    def gguf_tensors(self, sources: dict[str, SourceTensor]) -> Iterator[OutTensor]:
        """Map checkpoint tensors to GGUF tensors with gguf-py's own name table for the arch."""
        import gguf
        arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == self.gguf_arch)
        names = gguf.get_tensor_name_map(arch, self.hp.n_layer)
        for src in sources.values():
            if self.skip_tensor(src.name):
                continue
            new = names.get_name(src.name, try_suffixes=(".weight", ".bias"))
            if new is None:
                raise XvqError(f"{src.file or src.name}: tensor {src.name!r} has no GGUF name for arch "
                               f"{self.gguf_arch}; the checkpoint does not match its config")
            raw = None
            if src.raw_rows is not None and type(self).transform is Family.transform:  # a pure reordering
                raw = reordered(src.raw_rows, self.row_order(src))
            yield OutTensor(new, src.shape, self.transform(src), [src.name], raw_rows=raw, raw_dtype=src.dtype)
        yield from self.extra_tensors()

    def extra_tensors(self) -> Iterator[OutTensor]:
        """GGUF tensors made from the config, not read from the checkpoint: LLaMA-3.1's RoPE
        frequency factors (rope_freqs.weight), as llama.cpp's converter computes them."""
        scaling = self.rope_scaling()
        if scaling.get("type") == "llama3":
            factors = llama3_rope_factors(self.hp.rope_theta, self.rope_dim(), scaling)
            yield OutTensor("rope_freqs.weight", factors.shape, lambda sel: factors.reshape(1, -1)[sel])

    def rope_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hp.head_dim)

    def rope_scaling(self) -> dict:
        """rope_scaling (transformers 4) or rope_parameters (transformers 5), its kind under "type"
        (None when there is none or it is "default")."""
        c = self.config
        scaling = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        kind = scaling.get("rope_type", scaling.get("type"))
        scaling["type"] = None if kind in (None, "default") else str(kind).lower()
        if "original_max_position_embeddings" in c:  # transformers 5 keeps it beside, as the converter reads it
            scaling.setdefault("original_max_position_embeddings", c["original_max_position_embeddings"])
        if scaling["type"] not in (None, *ROPE_SCALING_KINDS):
            raise XvqError(f"{self.source}: rope_scaling type {kind!r} is not supported; xvq converts "
                           f"{', '.join(ROPE_SCALING_KINDS)} (what llama.cpp's converter maps for LLaMA)")
        return scaling

    def remote_code_files(self) -> dict[Path, str]:
        """The files a "remote-code" GPTQ folder carries: path here -> name in the folder."""
        here = Path(__file__).resolve().parent
        return {here / src: dst for src, dst in self.gptq_remote_code.items()}

    def is_70b(self) -> bool:
        """llama.cpp's quantizer gives LLaMA-2-70B-shaped models (80 layers, GQA) a recipe of its own."""
        hp = self.hp
        return self.gguf_arch == "llama" and hp.n_layer == 80 and hp.n_head != hp.n_head_kv

    def skip_tensor(self, name: str) -> bool:
        return name.endswith("rotary_emb.inv_freq")

    def row_order(self, src: SourceTensor) -> np.ndarray | None:
        """The order GGUF wants the rows of `src` in (None: as stored): q/k rows get llama.cpp's
        rope permutation."""
        if self.rope_permute_qk and src.name.endswith("self_attn.q_proj.weight"):
            return rope_permute_rows(src.shape[0], self.hp.n_head)
        if self.rope_permute_qk and src.name.endswith("self_attn.k_proj.weight"):
            return rope_permute_rows(src.shape[0], self.hp.n_head_kv)
        return None

    def transform(self, src: SourceTensor) -> RowReader:
        """float32 rows of the GGUF tensor made from `src`. A family that changes values (not
        just their order) overrides this; its tensors then always go through float32."""
        return reordered(src.rows, self.row_order(src))

    def write_hparams(self, w) -> None:
        hp = self.hp
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_dimension_count(hp.head_dim)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_vocab_size(hp.n_vocab)
        write_rope_scaling(w, self.rope_scaling())

    # --- metadata ---
    def default_chat_template(self, model_name: str) -> str | None:
        """Chat checkpoints without a template of their own get the family's."""
        return self.chat_template if "chat" in model_name.lower() else None


# What llama.cpp's converter maps for LLaMA. "dynamic" (NTK) writes nothing there either: within the
# trained context transformers' dynamic RoPE is plain RoPE, which is what llama.cpp then computes.
ROPE_SCALING_KINDS = ("linear", "yarn", "llama3", "dynamic")


def write_rope_scaling(w, scaling: dict) -> None:
    """The keys llama.cpp's converter writes for rope_scaling (TextModel.set_gguf_parameters);
    llama3 is a tensor instead (extra_tensors)."""
    import gguf
    kind, factor = scaling.get("type"), scaling.get("factor")
    if kind not in ("linear", "yarn") or factor is None:
        return
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(factor)
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
        attn = scaling.get("attention_factor", scaling.get("attn_factor"))
        for value, add in ((scaling.get("extrapolation_factor"), w.add_rope_scaling_yarn_ext_factor),
                           (attn, w.add_rope_scaling_yarn_attn_factor),
                           (scaling.get("beta_fast"), w.add_rope_scaling_yarn_beta_fast),
                           (scaling.get("beta_slow"), w.add_rope_scaling_yarn_beta_slow)):
            if value is not None:
                add(value)


def llama3_rope_factors(base: float, dim: int, scaling: dict) -> np.ndarray:
    """LLaMA-3.1's per-frequency RoPE divisors, computed as llama.cpp's converter does (torch
    float32, the same expressions) so the tensor is bit-identical to its rope_freqs.weight."""
    import math

    import torch
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_ctx = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32).numpy()


def rope_theta_of(c: dict) -> float | None:
    return c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta")


_REGISTRY: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    """Later registrations are tried first, so a specialised family (MoE) can claim a config
    before the general one it refines."""
    _REGISTRY.insert(0, cls)
    return cls


def families() -> list[type[Family]]:
    return list(_REGISTRY)


def family_for(config: dict, source: str = "config.json") -> Family:
    for cls in _REGISTRY:
        if cls.accepts(config):
            try:
                fam = cls(config, source)
                fam.rope_scaling()  # an unsupported kind is refused before any work
                return fam
            except KeyError as e:
                raise XvqError(f"{source}: {e.args[0]!r} is missing, which {cls.name} checkpoints need; "
                               f"use the config.json that came with the weights") from None
    archs = config.get("architectures") or [config.get("model_type", "?")]
    supported = sorted({a for f in _REGISTRY for a in f.architectures})
    raise XvqError(f"{source}: architecture {', '.join(map(str, archs))} is not supported; "
                   f"supported: {', '.join(supported)}")
