"""LLaMA and its derivatives (Ziya, Chinese-LLaMA, ...): SentencePiece vocab, optional GQA."""
from xvq.models.base import Family, register

# Ziya-LLaMA's published prompt: '<human>:' + query.strip() + '\n<bot>:' (turns joined by newlines).
ZIYA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] | trim }}{{ '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<human>:' + (message['content'] | trim) + '\n' }}"
    "{%- else -%}{{ '<bot>:' + (message['content'] | trim) + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<bot>:' }}{%- endif -%}"
)


@register
class Llama(Family):
    name = "llama"
    architectures = ("LlamaForCausalLM", "LLaMAForCausalLM")
    model_types = ("llama",)
    gguf_arch = "llama"
    vocab_kind = "auto"
    default_rms_eps = 1e-6
    chat_template_names = {"ziya": ZIYA_CHAT_TEMPLATE}
    # model-name substring -> chat_template_names key: derivatives known by name get their prompt
    # format whether or not "chat" is in the name (Ziya-LLaMA-13B-v1 is instruction-tuned).
    chat_templates_by_name = {"ziya": "ziya"}

    def default_chat_template(self, model_name: str) -> str | None:
        lowered = model_name.lower()
        for part, key in self.chat_templates_by_name.items():
            if part in lowered:
                return self.chat_template_names[key]
        return super().default_chat_template(model_name)
