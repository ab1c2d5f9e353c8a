"""Model cards (README.md with Hugging Face card metadata) and the Ollama Modelfile."""
from __future__ import annotations

import json
from pathlib import Path

from xvq.models import Family
from xvq.release.fit import fit_markdown


def front_matter(fam: Family, base_model: str, tags: list[str]) -> str:
    lines = ["---", f"base_model: {base_model}", "base_model_relation: quantized",
             f"license: {fam.license or 'other'}"]
    if fam.license_name:
        lines += [f"license_name: {fam.license_name}"]
    if fam.license_link:
        lines += [f"license_link: {fam.license_link}"]
    lines += ["language:"] + [f"- {lang}" for lang in fam.languages]
    lines += ["tags:"] + [f"- {t}" for t in tags] + ["pipeline_tag: text-generation", "---", ""]
    return "\n".join(lines)


def license_section(fam: Family) -> str:
    if not fam.license_name:
        return f"## License\n\nAs the original model: {fam.license or 'see the base model'}.\n"
    return (f"## License\n\nCode: {fam.license}. Weights: the **{fam.license_name}**"
            f"{f' ({fam.license_link})' if fam.license_link else ''}, as for the original model; "
            f"it applies to these quantized files too.\n")


def validation_section(report_md: str, plot_name: str | None) -> str:
    text = "## Quality (measured by `xvq validate` against the bf16 model)\n\n" + report_md.strip() + "\n"
    if plot_name:
        text += f"\n![perplexity ratio and KLD against bits per weight]({plot_name})\n"
    return text


def modelfile(fam: Family, gguf_name: str) -> str:
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{fam.ollama_template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in fam.stop_strings]
    return "\n".join(lines) + "\n"


def gguf_card(fam: Family, name: str, base_model: str, files: list[Path], report_md: str,
              plot_name: str | None, recommended: str) -> str:
    rows = "\n".join(f"| [{p.name}]({p.name}) | {p.stat().st_size / 1e9:.2f} GB |" for p in files)
    return front_matter(fam, base_model, ["gguf", "llama.cpp", "quantized", "xvq"]) + f"""# {name} GGUF

GGUF files of [{base_model}](https://huggingface.co/{base_model}) for llama.cpp and the apps built on it,
quantized with an importance matrix from a multilingual calibration set (xvq).

| file | size |
|---|---|
{rows}

{validation_section(report_md, plot_name)}
## Memory needed (laptop fit)

{fit_markdown(files)}
## How to run

llama.cpp:

```sh
llama-cli -m {recommended} -p "Hello" -n 128
```

LM Studio: search for this repository, or drop the .gguf into its models folder.

Ollama (the `Modelfile` beside these files carries the chat template and stop tokens):

```sh
ollama create {name.lower()} -f Modelfile && ollama run {name.lower()}
```

xvq (any platform): `xvq run {recommended} -p "Hello"`

{license_section(fam)}"""


def moe_calibration_line(folder: Path) -> str:
    """For an MoE model: how many experts the calibration text starved (quantize_config.json's
    xvq_expert_calibration, written by xvq.quantize.gptq_moe); empty for a dense model."""
    try:
        rec = json.loads((folder / "quantize_config.json").read_text(encoding="utf-8")).get("xvq_expert_calibration")
    except (OSError, ValueError):
        return ""
    if not rec or not rec.get("n_experts"):
        return ""
    return (f"\nMoE calibration: {rec['n_forced']} of {rec['n_experts']} routed experts "
            f"({100 * rec['forced_share']:.1f} %) were routed fewer than {rec['min_tokens']} calibration tokens "
            f"and were calibrated on every token instead; per-expert routed tokens are in quantize_config.json.\n")


def gptq_card(fam: Family, name: str, base_model: str, folder: Path, bits: int, report_md: str,
              plot_name: str | None) -> str:
    return front_matter(fam, base_model, ["gptq", f"{bits}bit", "quantized", "xvq"]) + f"""# {folder.name}

{bits}-bit GPTQ of [{base_model}](https://huggingface.co/{base_model}), calibrated on a multilingual set
(xvq, GPTQModel backend; format `gptq` v1, loadable by transformers, GPTQModel and vLLM).
{moe_calibration_line(folder)}
{validation_section(report_md, plot_name)}
## How to run

vLLM:

```sh
vllm serve {folder.name} --trust-remote-code
```

transformers (with optimum + GPTQModel installed):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("{folder.name}", device_map="auto", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{folder.name}")
```

{license_section(fam)}"""
