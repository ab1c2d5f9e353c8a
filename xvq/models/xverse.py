"""XVERSE dense (7B/13B/65B): LLaMA-shaped, MHA, untied lm_head, RMSNorm eps 1e-6, BPE vocab
with byte fallback in tokenizer.json. llama.cpp runs it as arch `xverse`."""
from xvq.models.base import Family, register

XVERSE_CHAT = ("{% for message in messages %}"
               "{% if message['role'] == 'user' %}{{ 'Human: ' + message['content'] + '\\n\\n' }}"
               "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + '<|endoftext|>' }}"
               "{% elif message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}{% endif %}"
               "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")


@register
class Xverse(Family):
    name = "xverse"
    architectures = ("XverseForCausalLM",)
    model_types = ("xverse",)
    gguf_arch = "xverse"
    vocab_kind = "bpe"
    chat_template = XVERSE_CHAT
    chat_template_names = {"xverse": XVERSE_CHAT}
    license = "apache-2.0"
    license_name = "XVERSE Model License Agreement"
    license_link = "https://github.com/xverse-ai/XVERSE-13B/blob/main/MODEL_LICENSE.pdf"
    languages = ("zh", "en", "ja", "ru", "de", "es", "fr", "ko", "multilingual")
    ollama_template = ('{{ if .System }}{{ .System }}\n\n{{ end }}Human: {{ .Prompt }}\n\n'
                       'Assistant: {{ .Response }}<|endoftext|>')
    stop_strings = ("<|endoftext|>", "Human:")
    # transformers 5 has no XVERSE class and XVERSE's remote code targets 4.38; vLLM dropped its
    # XVERSE model. The same weights load everywhere as LlamaForCausalLM.
    gptq_loads_as = "llama"

    @classmethod
    def accepts(cls, config: dict) -> bool:
        return super().accepts(config) and not config.get("num_experts")
