"""LLaMA and its derivatives (Ziya, Chinese-LLaMA, ...): SentencePiece vocab, optional GQA."""
from xvq.models.base import Family, register


@register
class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM", "LLaMAForCausalLM")
    model_types = ("llama",)
    gguf_arch = "llama"
    vocab_kind = "auto"
    default_rms_eps = 1e-6
