"""XVERSE-MoE (XVERSE-MoE-A4.2B): XVERSE's attention and vocabulary with a DeepSeek-MoE v1 FFN.

Config: `XverseForCausalLM` (serving stacks say `XverseMoeForCausalLM`) with `num_experts`.
Every layer is MoE: a router `mlp.router` [E, H], softmax over all E experts, top-`moe_top_k`,
the probabilities used without renormalisation, plus `mlp.shared_experts` (one SwiGLU MLP of
width intermediate_size × num_shared_experts) added for every token (SGLang's XverseMoE).

llama.cpp's arch `deepseek` (src/models/deepseek.cpp) computes exactly that: build_moe_ffn with
LLAMA_EXPERT_GATING_FUNC_TYPE_SOFTMAX, norm_w=false, w_scale = expert_weights_scale (1.0 means
none), layers below leading_dense_block_count (0 here) dense, and a shared-expert FFN of width
expert_feed_forward_length × expert_shared_count added to the routed output. Its rope is NORM
(interleaved), like `xverse`, so q/k get the same permutation as dense XVERSE.

GGUF tensors per layer: ffn_gate_inp [E, H] (F32), ffn_{gate,up}_exps [E, F, H],
ffn_down_exps [E, H, F] (experts stacked, written one expert's rows at a time from the memory
map), ffn_{gate,up,down}_shexp.
"""
from __future__ import annotations

import re
from typing import ClassVar, Iterator

import numpy as np

from xvq.errors import XvqError
from xvq.models.base import Hparams, OutTensor, RowReader, SourceTensor, register
from xvq.llamacpp.quant_types import gguf_order
from xvq.models.xverse import Xverse

EXPERT_RE = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
PROJS = ("gate", "up", "down")


@register
class XverseMoe(Xverse):
    name = "xverse-moe"
    architectures = ("XverseForCausalLM", "XverseMoeForCausalLM")
    model_types = ("xverse", "xverse_moe")
    gguf_arch = "deepseek"
    # GPTQ through GPTQModel's Qwen2-MoE definition (per-expert nn.Linear modules under
    # `mlp.experts.N`, expert count from config `num_experts`, shared experts beside them) with
    # XVERSE's module tree in its definitions/*.py format: "#" is the layer index, the inner "#"
    # the expert index. Groups follow XverseMoeBlock.forward: attention, routed experts, shared
    # experts; routed and shared stay separate groups as in GPTQModel's DeepSeek-V2 definition
    # (a mixed group would list the shared projections once per expert).
    gptq_base = "qwen2_moe"
    gptq_loads_as = "remote-code"   # no LLaMA-shaped stand-in: the folder carries its own modeling file
    gptq_remote_code = {"configuration_xverse.py": "configuration_xverse.py", "xverse_moe_hf.py": "modeling_xverse_moe.py"}
    gptq_auto_map = {"AutoConfig": "configuration_xverse.XverseConfig",
                     "AutoModelForCausalLM": "modeling_xverse_moe.XverseMoeForCausalLM"}
    gptq_module_tree: ClassVar[list] = [
        "model", "layers", "#",
        {
            "input_layernorm": ("input_layernorm:!",),
            "self_attn": ("q_proj:0", "k_proj:0", "v_proj:0", "o_proj:1"),
            "post_attention_layernorm": ("post_attention_layernorm:!",),
            "mlp:moe": {
                "router": ("router:!",),
                "experts": {"#": ("gate_proj:0", "up_proj:0", "down_proj:1")},
                "shared_experts": ("gate_proj:0", "up_proj:0", "down_proj:1"),
            },
        },
    ]
    gptq_definition_attrs: ClassVar[dict] = {"dynamic_expert_index": "num_experts",
                                             "pre_lm_head_norm_module": "model.norm",
                                             "require_trust_remote_code": False}
    # Per-expert importance statistics: llama.cpp's imatrix keeps one row of n_per_row sums per
    # expert of a stacked tensor (its rows are grouped by expert); the HF module of expert e of
    # GGUF tensor `blk.N.ffn_X_exps` is `model.layers.N.mlp.experts.e.X_proj`.
    expert_module_pattern: ClassVar[str] = "model.layers.{layer}.mlp.experts.{expert}.{proj}_proj"

    @classmethod
    def accepts(cls, config: dict) -> bool:
        archs = set(config.get("architectures") or [])
        named = bool(archs & set(cls.architectures)) or config.get("model_type") in cls.model_types
        return named and bool(config.get("num_experts"))

    def hparams(self, c: dict) -> Hparams:
        hp = super().hparams(c)
        hp.n_expert = int(c["num_experts"])
        top_k = c.get("moe_top_k") or c.get("num_experts_per_tok")
        if not top_k:
            raise XvqError("config.json: num_experts is set but moe_top_k (experts per token) is missing; "
                           "use the config that came with the checkpoint")
        hp.n_expert_used = int(top_k)
        hp.n_shared_expert = int(c.get("num_shared_experts") or 0)
        hp.n_ff_exp = hp.n_ff
        return hp

    @property
    def n_ff_shared(self) -> int:
        return self.hp.n_ff_exp * self.hp.n_shared_expert

    # --- shapes ---
    def ffn_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        hp, p = self.hp, f"model.layers.{i}.mlp."
        shapes = {p + "router.weight": (hp.n_expert, hp.n_embd)}
        for e in range(hp.n_expert):
            shapes |= mlp_shapes(f"{p}experts.{e}.", hp.n_embd, hp.n_ff_exp)
        if hp.n_shared_expert:
            shapes |= mlp_shapes(p + "shared_experts.", hp.n_embd, self.n_ff_shared)
        return shapes

    # --- GGUF ---
    def skip_tensor(self, name: str) -> bool:
        return super().skip_tensor(name) or EXPERT_RE.match(name) is not None

    def gguf_tensors(self, sources: dict[str, SourceTensor]) -> Iterator[OutTensor]:
        """Base mapping for everything but the routed experts (router and shared experts have
        gguf-py names), plus one stacked tensor per layer and projection; in llama.cpp's own
        tensor order (layer, then name), which is also the order its quantizer walks."""
        out = list(super().gguf_tensors(sources))
        out += [self.stacked_experts(sources, i, proj) for i in range(self.hp.n_layer) for proj in PROJS]
        yield from sorted(out, key=lambda t: gguf_order(t.name))

    def stacked_experts(self, sources: dict[str, SourceTensor], layer: int, proj: str) -> OutTensor:
        """`blk.L.ffn_P_exps`; its `sources` list the experts' HF weights in expert (row-group)
        order, which is how per-expert imatrix rows map back to modules."""
        names = [f"model.layers.{layer}.mlp.experts.{e}.{proj}_proj.weight" for e in range(self.hp.n_expert)]
        parts = [sources[n] for n in names]
        return OutTensor(f"blk.{layer}.ffn_{proj}_exps.weight", (len(parts), *parts[0].shape),
                         stacked_rows(parts), names)

    def write_hparams(self, w) -> None:
        super().write_hparams(w)
        hp = self.hp
        w.add_leading_dense_block_count(0)
        w.add_expert_feed_forward_length(hp.n_ff_exp)
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(hp.n_expert_used)
        w.add_expert_shared_count(hp.n_shared_expert)
        w.add_expert_weights_scale(1.0)


def mlp_shapes(prefix: str, n_embd: int, width: int) -> dict[str, tuple[int, int]]:
    return {prefix + "gate_proj.weight": (width, n_embd), prefix + "up_proj.weight": (width, n_embd),
            prefix + "down_proj.weight": (n_embd, width)}


def stacked_rows(parts: list[SourceTensor]) -> RowReader:
    """Rows of [E, R, C] (E experts of [R, C]) viewed as [E*R, C]; each request is served expert
    by expert from that expert's own (memory-mapped) reader, so nothing beyond the requested
    block is ever materialised."""
    per = parts[0].n_rows
    total = per * len(parts)

    def rows(sel) -> np.ndarray:
        if isinstance(sel, slice):
            start, stop, step = sel.indices(total)
            if step == 1:
                return np.concatenate([parts[e].rows(slice(max(start, e * per) - e * per,
                                                           min(stop, (e + 1) * per) - e * per))
                                       for e in range(start // per, -(-stop // per))]
                                      or [np.zeros((0, parts[0].shape[-1]), np.float32)])
            sel = np.arange(start, stop, step)
        idx = np.asarray(sel)
        experts = idx // per
        cuts = np.flatnonzero(np.diff(experts)) + 1
        return np.concatenate([parts[int(chunk[0] // per)].rows(chunk - chunk[0] // per * per)
                               for chunk in np.split(idx, cuts)])
    return rows
