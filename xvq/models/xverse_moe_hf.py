"""XVERSE-MoE (XVERSE-MoE-A4.2B) in transformers, without remote code.

Everything but the feed-forward block is LLaMA's (attention, RoPE, RMSNorm, decoder wiring), so
the classes below compose transformers' Llama pieces and only the MLP is new. The MoE block
follows SGLang's `XverseMoE` (python/sglang/srt/models/xverse_moe.py): a router `mlp.router`
[num_experts, hidden], softmax over *all* experts, top-`moe_top_k`, the chosen probabilities used
as they are (no renormalisation), plus `mlp.shared_experts`, one MLP of width
intermediate_size × num_shared_experts that every token goes through, added to the routed sum.

Checkpoint names (what save_pretrained writes and from_pretrained reads):
    model.layers.N.mlp.router.weight
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight
    model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight
Each expert is a plain nn.Linear triple so per-module tools (GPTQ, imatrix hooks) see them.

MoE GPTQ folders ship this file as `modeling_xverse_moe.py` beside `configuration_xverse.py`
(auto_map, trust_remote_code): keep its imports to torch, transformers and that relative one.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, LlamaPreTrainedModel, LlamaRMSNorm, LlamaRotaryEmbedding,
)

from .configuration_xverse import XverseConfig


class XverseMoeMLP(nn.Module):
    """SwiGLU MLP of a given width (an expert, or the fused shared experts)."""

    def __init__(self, config, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SGLang/vLLM fused_topk with renormalize=False: softmax in float32 over every expert,
    keep the top-k probabilities unchanged. Returns (weights [N, k] float32, expert ids [N, k])."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    return torch.topk(probs, top_k, dim=-1)


class XverseMoeBlock(nn.Module):
    # Set only while GPTQ calibrates (xvq.quantize.gptq_moe): called as hook(block, x, chosen
    # expert ids) after the experts ran; it may run starved experts on more tokens for their
    # statistics, never touching the output.
    calibration_hook = None

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_experts = config.num_experts
        self.top_k = config.moe_top_k
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList(XverseMoeMLP(config, config.intermediate_size)
                                     for _ in range(config.num_experts))
        n_shared = getattr(config, "num_shared_experts", 0) or 0
        self.shared_experts = XverseMoeMLP(config, config.intermediate_size * n_shared) if n_shared else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        weights, chosen = route(self.router(x), self.top_k)
        out = torch.zeros_like(x)
        # Loop over the experts that received tokens (each sees only its tokens, as in serving),
        # so calibration hooks on an expert's Linear layers see exactly its routed inputs.
        try:
            for e in torch.unique(chosen).tolist():
                token, slot = torch.where(chosen == e)
                y = self.experts[e](x[token]) * weights[token, slot, None].to(x.dtype)
                out.index_add_(0, token, y)
        finally:   # also when GPTQModel stops the forward early after its last hooked module
            if self.calibration_hook is not None:
                self.calibration_hook(self, x, chosen)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class XverseMoeDecoderLayer(LlamaDecoderLayer):
    """LLaMA's decoder layer with the MoE block as its MLP."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.mlp = XverseMoeBlock(config, layer_idx)


class XverseMoePreTrainedModel(LlamaPreTrainedModel):
    config_class = XverseConfig
    config: XverseConfig
    _no_split_modules = ["XverseMoeDecoderLayer"]
    _can_compile_fullgraph = False  # data-dependent expert loop


class XverseMoeModel(XverseMoePreTrainedModel, LlamaModel):
    """LlamaModel (its forward, mask and rope handling) with MoE decoder layers."""

    def __init__(self, config):
        XverseMoePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(XverseMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class XverseMoeForCausalLM(XverseMoePreTrainedModel, LlamaForCausalLM):
    """Causal LM head over XverseMoeModel; forward/generate are LlamaForCausalLM's."""

    def __init__(self, config):
        XverseMoePreTrainedModel.__init__(self, config)
        self.model = XverseMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
