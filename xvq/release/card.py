"""Model cards (README.md with the front matter Hugging Face and ModelScope read) and the Ollama
Modelfile. "How to run" gives the exact commands for what xvq tested, and names the rest as
expected, not tested."""
from __future__ import annotations

import json
import re
from pathlib import Path

from xvq.models import Family
from xvq.fit import fit_markdown

# LLaMA-architecture serving stacks: they read LlamaForCausalLM GPTQ folders, xvq does not run them.
UNTESTED_LLAMA_LOADERS = "vLLM and SGLang"


def human_size(n: int) -> str:
    """1234 -> '1.2 KB', 9_500_000 -> '9.5 MB', 7.1e9 -> '7.10 GB' (decimal units, as the hubs show)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GB" else f"{n / scale:.1f} {unit}"
    return f"{n} B"


def license_id(name: str) -> str:
    """The hubs' `license_name` is an id: lower case, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def front_matter(fam: Family, base_model: str, tags: list[str]) -> str:
    """A model licence that is not an SPDX one is `license: other` + license_name + license_link."""
    lines = ["---", f"base_model: {base_model}", "base_model_relation: quantized"]
    if fam.license_name:
        lines += ["license: other", f"license_name: {license_id(fam.license_name)}"]
        if fam.license_link:
            lines += [f"license_link: {fam.license_link}"]
    else:
        lines += [f"license: {fam.license or 'other'}"]
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
    rows = "\n".join(f"| [{p.name}]({p.name}) | {human_size(p.stat().st_size)} |" for p in files)
    tag = name.lower()
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

Each file here was loaded and scored in llama.cpp by `xvq validate` (the table above).

llama.cpp's CLI (chat, with the template stored in the file):

```sh
llama-cli -m {recommended} -cnv
```

Ollama, with the `Modelfile` beside these files (chat template and stop tokens):

```sh
ollama create {tag} -f Modelfile
ollama run {tag}
```

xvq (any platform): `xvq run {recommended} -p "Hello"`

{license_section(fam)}"""


def gptq_form(folder: Path) -> str:
    """How the folder declares itself: "llama" (LlamaForCausalLM), "remote-code" (auto_map) or "source"."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "auto_map" in config and any((folder / f).is_file() for f in ("modeling_xverse_moe.py",)):
        return "remote-code"
    if config.get("architectures") == ["LlamaForCausalLM"]:
        return "llama"
    return "source"


def gptq_how_to_run(folder: Path) -> str:
    form = gptq_form(folder)
    remote = ", trust_remote_code=True" if form == "remote-code" else ""
    lines = ["## How to run", "",
             "transformers with GPTQModel installed (`pip install transformers gptqmodel`); xvq tested this on "
             "CPU, in a fresh Python process without xvq"
             + (" (the modeling file ships in this folder)." if remote else ", without remote code."), "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{folder.name}", device_map="auto"{remote})',
             f'tokenizer = AutoTokenizer.from_pretrained("{folder.name}")', "```", ""]
    if form == "llama":
        lines += [f"Saved as `LlamaForCausalLM` (XVERSE's dense architecture is LLaMA's: the same weights and "
                  f"outputs); `quantize_config.json` names the XVERSE source. {UNTESTED_LLAMA_LOADERS} load "
                  f"LLaMA-architecture GPTQ folders: expected to work, not tested by xvq.", ""]
    elif form == "source":
        lines += [f"{UNTESTED_LLAMA_LOADERS} load LLaMA-architecture GPTQ folders: expected to work, "
                  f"not tested by xvq.", ""]
    return "\n".join(lines)


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
(xvq, GPTQModel backend; format `gptq` v1).
{moe_calibration_line(folder)}
{validation_section(report_md, plot_name)}
{gptq_how_to_run(folder)}
{license_section(fam)}"""
