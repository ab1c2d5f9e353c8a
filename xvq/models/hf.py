"""XVERSE in transformers without remote code: one `model_type: xverse` entry in the Auto
classes. Dense XVERSE is LLaMA-identical, so it runs on transformers' Llama implementation;
configs with `num_experts` dispatch to the MoE implementation (xvq.models.xverse_moe_hf)."""
from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from xvq.models.configuration_xverse import XverseConfig


class XverseForCausalLM(LlamaForCausalLM):
    config_class = XverseConfig

    def __new__(cls, config, *args, **kwargs):
        moe = _moe_class() if getattr(config, "num_experts", 0) else None
        if moe is not None and cls is XverseForCausalLM:
            return moe(config, *args, **kwargs)
        return super().__new__(cls)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        config = kwargs.get("config")
        if config is None:
            config = AutoConfig.from_pretrained(args[0], **{k: v for k, v in kwargs.items()
                                                            if k in ("revision", "local_files_only")})
            kwargs["config"] = config
        moe = _moe_class() if getattr(config, "num_experts", 0) else None
        if moe is not None and cls is XverseForCausalLM:
            return moe.from_pretrained(*args, **kwargs)
        return super().from_pretrained(*args, **kwargs)


def _moe_class():
    try:
        from xvq.models.xverse_moe_hf import XverseMoeForCausalLM
    except ImportError:
        return None
    return XverseMoeForCausalLM


def register() -> None:
    try:
        AutoConfig.register("xverse", XverseConfig, exist_ok=True)
        AutoModelForCausalLM.register(XverseConfig, XverseForCausalLM, exist_ok=True)
    except TypeError:  # older transformers without exist_ok
        AutoConfig.register("xverse", XverseConfig)
        AutoModelForCausalLM.register(XverseConfig, XverseForCausalLM)


register()
