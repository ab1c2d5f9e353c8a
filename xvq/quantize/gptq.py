"""GPTQ checkpoints for GPU servers, calibrated on the multilingual mix, through GPTQModel.

    model folder (HF, safetensors or XVERSE's pickle shards)
      -> gptq_source: GPTQModel reads XVERSE's pickle shards memory-mapped, without a copy
      -> GPTQModel, through the GPTQ definition the family declares (`Family.gptq_base`,
         optionally its own `gptq_module_tree`), one decoder layer in memory at a time
      -> <Name>-GPTQ-Int<bits>/: sharded safetensors, quantize_config.json (format gptq, v1),
         config.json + quantization_config, the original tokenizer; no local paths.

How the folder declares itself (`Family.gptq_loads_as`, overridden by keep_architecture):
- LLaMA, Ziya: the source's config as it is.
- dense XVERSE ("llama"): LlamaForCausalLM / model_type llama, no auto_map. XVERSE is
  LLaMA-identical, transformers 5 has no XVERSE class, XVERSE's remote code targets transformers
  4.38 and vLLM dropped its XVERSE model, so only this form loads in plain transformers (tested
  in a fresh process). quantize_config.json records the source's architecture.
- XVERSE-MoE ("remote-code"): the source's config with auto_map pointing at xvq's own modeling
  file for transformers 5 (xverse_moe_hf.py + configuration_xverse.py, shipped in the folder),
  so trust_remote_code=True loads it without xvq installed.
GPTQModel's own XVERSE definition pins transformers <= 4.38, so XVERSE quantizes through the
LLaMA definition either way.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from xvq.calib_data import calibration
from xvq.checkpoint import read_config, weight_files
from xvq.errors import XvqError
from xvq.fsio import atomic_output, require_free, scratch_dir
from xvq.heap import bound_kernel_caches, return_freed_buffers_to_os
from xvq.models import family_for
from xvq.models.base import Family
from xvq.quantize import gptq_moe
from xvq.quantize.gptq_source import gptq_readable, staged_bytes

log = logging.getLogger("xvq.gptq")

ALLOWED_BITS = (2, 3, 4, 8)
# Files that travel from the source folder unchanged: tokenizer, generation settings, the
# remote code that config.json's auto_map names, license notes.
CARRIED_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
CARRIED_GLOBS = ("*.py", "LICENSE*", "NOTICE*", "*.tiktoken")
# What GPTQModel re-saves of the tokenizer (replaced by the originals, or dropped when the source had none).
# GPTQModel's generation_config.json is its "fixed" guess (it turns sampling on); only the source's own travels.
RESAVED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "chat_template.jinja", "generation_config.json")
MIN_SEQ_TOKENS = 16
OUTPUT_DTYPE = "float16"


@dataclass
class GptqSettings:
    """XVERSE's published GPTQ settings are the defaults (4-bit, g128, act-order, static groups,
    symmetric, true-sequential, damp 0.01)."""
    bits: int = 4
    group_size: int | None = None   # None: 128, halved until it divides every width (MoE experts)
    desc_act: bool = True
    static_groups: bool = True
    sym: bool = True
    true_sequential: bool = True
    damp: float = 0.01
    damp_auto_increment: float = 0.01
    calib_tokens: int = 131072
    max_seq_len: int = 2048
    seed: int = 0
    max_shard_size: str = "4GB"
    device: str = "auto"           # auto | cpu | cuda
    # Activations while calibrating: auto = bfloat16 on CPU (fp16 matmuls are several times
    # slower there), float16 on CUDA. The output is float16 either way (XVERSE's GPTQ releases
    # are; vLLM's GPTQ kernels want it).
    calib_dtype: str = "auto"
    # MoE: an expert routed fewer calibration tokens than this also sees every token (gptq_moe);
    # None: the hidden size (fewer tokens leave its Hessian rank-deficient)
    moe_min_tokens: int | None = None
    # Keep the source's architectures/model_type/auto_map instead of the form plain transformers
    # loads (Family.gptq_loads_as)
    keep_architecture: bool = False

    def torch_calib_dtype(self):
        import torch
        if self.calib_dtype != "auto":
            return getattr(torch, self.calib_dtype)
        on_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return torch.float16 if on_cuda else torch.bfloat16

    def quantize_config(self, offload_dir: Path):
        from gptqmodel import QuantizeConfig
        return QuantizeConfig(
            bits=self.bits, group_size=self.group_size, desc_act=self.desc_act, act_group_aware=False,
            static_groups=self.static_groups, sym=self.sym, true_sequential=self.true_sequential,
            damp_percent=self.damp, damp_auto_increment=self.damp_auto_increment,
            device=None if self.device == "auto" else self.device,
            offload_to_disk=True, offload_to_disk_path=str(offload_dir))


@dataclass
class GptqResult:
    outdir: Path
    n_sequences: int
    n_tokens: int
    layers: list[dict] = field(default_factory=list)    # GPTQModel's per-module log (layer, module, loss, damp, time)
    damp_raised: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------

def linear_input_widths(family: Family) -> dict[str, int]:
    """Input width of every linear GPTQ quantizes (per kind of module, layer 0 stands for all)."""
    widths = {}
    for name, shape in family.expected_shapes().items():
        if ".layers.0." in name and name.endswith("_proj.weight") and len(shape) == 2:
            widths[name.split(".layers.0.", 1)[1].removesuffix(".weight")] = shape[1]
    return widths


def mmap_threshold(family: Family) -> int:
    """A quarter of GPTQ's smallest per-module block, the narrowest input's Hessian (width² float32):
    every Hessian and weight is then mapped and unmapped, the smaller activations stay on the heap."""
    return min(linear_input_widths(family).values()) ** 2


def check_settings(settings: GptqSettings, family: Family, source: Path) -> None:
    if settings.bits not in ALLOWED_BITS:
        raise XvqError(f"--bits {settings.bits}: not a GPTQ width; use one of {', '.join(map(str, ALLOWED_BITS))}")
    if settings.group_size != -1 and settings.group_size <= 0:
        raise XvqError(f"--group-size {settings.group_size}: use a positive size (128) or -1 for one group per row")
    if settings.group_size > 0:
        bad = {m: w for m, w in linear_input_widths(family).items() if w % settings.group_size}
        if bad:
            listed = ", ".join(f"{m} ({w})" for m, w in bad.items())
            raise XvqError(f"{source / 'config.json'}: --group-size {settings.group_size} does not divide the input "
                           f"width of {listed}; choose a group size that divides every width, or -1")
    if settings.group_size == -1 or settings.group_size > 256:
        log.warning("--group-size %d: valid GPTQ, but GPTQModel 7.6's CPU kernel (torch int4pack) loads only "
                    "groups of 32-256 columns; the result loads on GPU kernels (Marlin, ExLlama)", settings.group_size)
    if not 0 < settings.damp < 1:
        raise XvqError(f"--damp {settings.damp}: use a fraction of the Hessian's mean diagonal in (0, 1), e.g. 0.01")
    if settings.device not in ("auto", "cpu", "cuda"):
        raise XvqError(f"--device {settings.device}: use auto, cpu or cuda")
    if settings.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise XvqError("--device cuda: no CUDA device is visible to torch here; use --device cpu or auto")


# ----------------------------------------------------------------------------------------------
# Calibration
# ----------------------------------------------------------------------------------------------

def calibration_sequences(tokenizer, texts: Sequence[str], budget_tokens: int, max_seq_len: int,
                          seed: int) -> list[dict]:
    """Token sequences of max_seq_len (the last may be shorter), up to budget_tokens in all: the
    texts in a seeded order, separated by blank lines, packed into consecutive windows (the
    calibration set's paragraphs are short; GPTQ's Hessians want context). Deterministic per seed."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    stream: list[int] = []
    for i in order:
        if texts[i].strip():
            stream += tokenizer(texts[i] + "\n\n", add_special_tokens=False)["input_ids"]
        if len(stream) >= budget_tokens:
            break
    stream = stream[:budget_tokens]
    windows = [stream[k:k + max_seq_len] for k in range(0, len(stream), max_seq_len)]
    return [{"input_ids": w, "attention_mask": [1] * len(w)} for w in windows if len(w) >= MIN_SEQ_TOKENS]


# ----------------------------------------------------------------------------------------------
# The GPTQModel definition a family quantizes through
# ----------------------------------------------------------------------------------------------

def qmodel_class(family: Family):
    """GPTQModel's definition named by `family.gptq_base`; a family that declares its own
    `gptq_module_tree` (MoE experts) gets a subclass carrying it."""
    from gptqmodel.models.auto import MODEL_MAP
    base = MODEL_MAP.get(family.gptq_base)
    if base is None:
        raise XvqError(f"model family {family.name}: GPTQModel 7.6 has no definition {family.gptq_base!r}; "
                       f"declare gptq_base as one of its model types")
    tree = getattr(family, "gptq_module_tree", None)
    attrs = dict(getattr(family, "gptq_definition_attrs", None) or {})
    if tree is not None:
        attrs["module_tree"] = tree
    if not attrs:
        return base
    return type(f"Xvq{type(family).__name__}QModel", (base,), attrs)


# ----------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------

def names_path(text: str, path: str) -> bool:
    """`path` occurs in `text` as a whole path (so /model does not match /modelcloud in a URL)."""
    return len(path) > 1 and re.search(re.escape(path) + r"(?![\w.-])", text) is not None


def scrub_paths(value, forbidden: Iterable[str]):
    """Drop what only made sense on the machine that quantized: *_path / *_dir entries and any
    string naming one of the working folders."""
    forbidden = [f for f in forbidden if f]
    if isinstance(value, dict):
        return {k: (None if re.search(r"(_path|_dir|_folder)$", k) and isinstance(v, str) else scrub_paths(v, forbidden))
                for k, v in value.items() if k not in ("dataset", "calibration_dataset", "calibration")}
    if isinstance(value, list):
        return [scrub_paths(v, forbidden) for v in value]
    if isinstance(value, str) and any(names_path(value, f) for f in forbidden):
        return None
    return value


def loads_as(family: Family, settings: GptqSettings) -> str | None:
    return None if settings.keep_architecture else family.gptq_loads_as


def declared_config(config: dict, form: str | None) -> dict:
    """The source's config in the form the output folder declares (see the module docstring)."""
    family = family_for(config)
    if form == "llama":
        config = {k: v for k, v in config.items() if k != "auto_map"}
        config |= {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
        config.setdefault("rms_norm_eps", family.default_rms_eps)   # LLaMA's class would read its own default
    elif form == "remote-code":
        config = config | {"auto_map": dict(family.gptq_auto_map)}
    return config


def source_note(config: dict, form: str | None) -> dict | None:
    """What quantize_config.json says of a source whose architecture the folder does not keep."""
    if form != "llama":
        return None
    return {"architectures": config.get("architectures"), "model_type": config.get("model_type"),
            "saved_as": "LlamaForCausalLM: the same weights and computation; "
                        "`xvq quantize gptq --keep-architecture` keeps the source's config"}


def write_configs(out: Path, model_dir: Path, forbidden: list[str], dtype: str, form: str | None = None) -> dict:
    """config.json = the source's config in the declared form (declared_config) plus GPTQ's
    quantization_config; quantize_config.json scrubbed the same way."""
    qcfg_path = out / "quantize_config.json"
    quant = scrub_paths(json.loads(qcfg_path.read_text(encoding="utf-8")), forbidden)
    # AutoGPTQ-era readers (and XVERSE's published GPTQ folders) keep these at the top level;
    # GPTQModel 7.6 files them under "meta".
    for key in ("damp_percent", "static_groups", "true_sequential"):
        if key in (quant.get("meta") or {}):
            quant.setdefault(key, quant["meta"][key])
    source = read_config(model_dir)
    note = source_note(source, form)
    if note:
        quant["xvq_source_model"] = note
    qcfg_path.write_text(json.dumps(quant, indent=2) + "\n", encoding="utf-8")
    config = declared_config(source, form)
    config.pop("quantization_config", None)
    config |= {"torch_dtype": dtype, "quantization_config": quant}
    if "dtype" in config:   # transformers 5 writes `dtype`; both must agree
        config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return config


def cast_shards(out: Path, dtype: str) -> None:
    """Floating tensors (embeddings, norms, lm_head, scales) to `dtype`, one shard at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    target = getattr(torch, dtype)
    total = 0
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if any(t.is_floating_point() and t.dtype != target for t in tensors.values()):
            tensors = {k: t.to(target) if t.is_floating_point() else t for k, t in tensors.items()}
            mode = shard.stat().st_mode
            save_file(tensors, str(shard), metadata=metadata)
            os.chmod(shard, mode)   # safetensors writes 0600; keep the shard readable like the rest
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = out / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def carry_source_files(out: Path, model_dir: Path, form: str | None = None) -> None:
    """Tokenizer and licence files; the source's remote code only where config.json still names
    it (form None), xvq's own where it names that."""
    for name in RESAVED_TOKENIZER_FILES:
        (out / name).unlink(missing_ok=True)
    for name in CARRIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
    for pattern in CARRIED_GLOBS:
        for f in model_dir.glob(pattern):
            if f.is_file() and not (form and f.suffix == ".py"):
                shutil.copy2(f, out / f.name)
    if form == "remote-code":
        for src, dst in family_for(read_config(model_dir)).remote_code_files().items():
            shutil.copy2(src, out / dst)


def assert_no_local_paths(out: Path, forbidden: list[str]) -> None:
    """Last guard: no text file of the output names a working folder of this machine."""
    for f in out.iterdir():
        if f.suffix in (".json", ".csv", ".txt", ".md"):
            text = f.read_text(encoding="utf-8", errors="replace")
            for p in forbidden:
                if names_path(text, p):
                    raise XvqError(f"{f.name}: would record the local path {p}; this is a bug in xvq, please report it")


# ----------------------------------------------------------------------------------------------
# Quantization
# ----------------------------------------------------------------------------------------------

def check_damp(quant_log: list[dict], settings: GptqSettings, model_dir: Path) -> list[str]:
    """GPTQModel raises damp on a Cholesky failure by itself; say where, and refuse a module that
    never became positive-definite."""
    raised = []
    for entry in quant_log:
        damp = float(entry.get("damp") or settings.damp)
        where = f"layer {entry.get('layer')} {entry.get('module')}"
        if damp >= 1.0:
            raise XvqError(f"{model_dir}: GPTQ Hessian of {where} stayed singular even at damp 1.0; "
                           f"calibrate on more text (--calib-tokens) or raise --damp")
        if damp > settings.damp + 1e-9:
            raised.append(f"{where}: damp {settings.damp:g} -> {damp:.4f}")
            log.warning("Cholesky failed for %s at damp %g; damp raised to %.4f", where, settings.damp, damp)
    return raised


def xvq_version() -> str:
    from xvq import __version__
    return __version__


def _prepare_environment() -> None:
    # GPTQModel sizes its CPU worker pool from this; without it a small machine oversubscribes.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(os.cpu_count() or 1))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    bound_kernel_caches()   # effective here when nothing in this process has run a matmul yet
    import xvq  # noqa: F401  (registers XVERSE with transformers before GPTQModel loads configs)


def quantize_gptq(model_dir: Path | str, outdir: Path | str, settings: GptqSettings | None = None,
                  texts: Sequence[str] | None = None, on_model: Callable | None = None) -> GptqResult:
    """Quantize `model_dir` into `outdir` (replaced atomically). `texts`: calibration text; by
    default the calibration mix from xvq.calib_data. `on_model(qmodel)` runs before calibration
    (the benchmark hooks its decoder layers there)."""
    model_dir, outdir = Path(model_dir), Path(outdir)
    settings = settings or GptqSettings()
    config = read_config(model_dir)
    family = family_for(config, str(model_dir / "config.json"))
    settings = gptq_moe.resolve_group_size(settings, linear_input_widths(family))
    check_settings(settings, family, model_dir)
    _prepare_environment()
    if texts is None:
        texts = calibration(budget_tokens=settings.calib_tokens, tokenizer_dir=model_dir, seed=settings.seed).texts
    import torch
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # GPTQModel cuts longer sequences at max_position_embeddings, dropping their tail: cut here instead.
    seq_len = min(settings.max_seq_len, family.hp.n_ctx)
    seqs = calibration_sequences(tokenizer, texts, settings.calib_tokens, seq_len, settings.seed)
    if not seqs:
        raise XvqError(f"{model_dir}: no calibration text of at least {MIN_SEQ_TOKENS} tokens; "
                       f"check xvq calib show, or pass more text")
    n_tokens = sum(len(s["input_ids"]) for s in seqs)
    log.info("GPTQ %d-bit g%d: %d calibration sequences, %d tokens", settings.bits, settings.group_size, len(seqs), n_tokens)

    # GPTQModel's offload folder lives beside the output (same disk the user chose, hidden from
    # Layout.gptqs()), not in /tmp, which may be small.
    weights = sum(f.stat().st_size for f in weight_files(model_dir))   # offload + output
    require_free(outdir.parent, int(weights * (1.05 + settings.bits / 16)) + staged_bytes(model_dir),
                 f"GPTQ of {model_dir}")
    with atomic_output(outdir, is_dir=True) as tmp, \
            scratch_dir(outdir.parent, f"{outdir.name}.work") as work, \
            gptq_readable(model_dir, Path(work)) as source:   # work is swept if this run is killed
        work = Path(work)
        cls = qmodel_class(family)
        return_freed_buffers_to_os(mmap_threshold(family))   # else the peak grows with every layer (xvq/heap.py)
        torch.manual_seed(settings.seed)
        model = cls.from_pretrained(str(source), quantize_config=settings.quantize_config(work / "offload"),
                                    dtype=settings.torch_calib_dtype())
        if on_model is not None:
            on_model(model)
        with gptq_moe.expert_calibration(model.model, n_tokens,
                                         gptq_moe.min_expert_tokens(n_tokens, settings.moe_min_tokens,
                                                                    family.hp.n_embd)) as experts:
            model.quantize(seqs, batch_size=1, tokenizer=tokenizer)
        damp_raised = check_damp(model.quant_log, settings, model_dir)
        model.save(str(tmp), max_shard_size=settings.max_shard_size, meta_quantizer=f"xvq:{xvq_version()}")
        quant_log = [dict(e) for e in model.quant_log]
        del model
        forbidden = [str(work), str(work.resolve()), str(tmp), str(tmp.resolve()), str(model_dir.resolve()),
                     str(outdir.resolve().parent)]
        cast_shards(tmp, OUTPUT_DTYPE)
        form = loads_as(family, settings)
        write_configs(tmp, model_dir, forbidden, OUTPUT_DTYPE, form)
        if experts is not None:
            gptq_moe.record_in_quantize_config(tmp, experts, quant_log)
        carry_source_files(tmp, model_dir, form)
        assert_no_local_paths(tmp, forbidden)
    return GptqResult(outdir, len(seqs), n_tokens, quant_log, damp_raised)
