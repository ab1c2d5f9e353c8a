"""XVERSE's config for transformers: LLaMA's, plus the MoE fields. Self-contained (imports only
transformers) because MoE GPTQ folders ship it, with xverse_moe_hf.py as modeling_xverse_moe.py,
as remote code that loads without xvq installed."""
from transformers import LlamaConfig


class XverseConfig(LlamaConfig):
    model_type = "xverse"

    def __init__(self, num_experts: int = 0, num_shared_experts: int = 0, moe_top_k: int = 0, **kwargs):
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.moe_top_k = moe_top_k
        kwargs.setdefault("rms_norm_eps", 1e-6)
        super().__init__(**kwargs)
