"""What an artifact is, read from its headers only: kind, quant type, size, bits per weight,
vocabulary. Any failure becomes an `error` string for the report, never an exception."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xvq.checkpoint import weight_files
from xvq.errors import XvqError
from xvq.layout import gguf_shards


@dataclass
class ArtifactInfo:
    path: Path
    kind: str                       # gguf | gptq | hf
    quant_type: str | None = None
    size_bytes: int | None = None
    bpw: float | None = None
    n_vocab: int | None = None
    tokens: list[str] | None = field(default=None, repr=False)   # GGUF token list, for the vocab check
    error: str | None = None
    shape: "ModelShape | None" = None   # what the artifact says it is a quantization of


@dataclass(frozen=True)
class ModelShape:
    """What identifies the model an artifact was made from: llama.cpp's architecture (XVERSE's
    GPTQ folders say LlamaForCausalLM, its GGUFs `llama`: the same), depth, width, vocabulary."""
    architecture: str
    layers: int
    width: int
    vocab: int | None

    @classmethod
    def of_config(cls, config: dict) -> "ModelShape":
        from xvq.models import family_for
        fam = family_for(config)
        return cls(fam.gguf_arch, fam.hp.n_layer, fam.hp.n_embd, fam.hp.n_vocab)

    def differences(self, reference: "ModelShape") -> list[str]:
        return [f"{what} {mine} (the reference: {theirs})" for what, mine, theirs in
                (("architecture", self.architecture, reference.architecture), ("layers", self.layers, reference.layers),
                 ("width", self.width, reference.width), ("vocabulary", self.vocab, reference.vocab))
                if mine is not None and theirs is not None and mine != theirs]


def file_type_name(value: int) -> str | None:
    import gguf
    try:
        name = gguf.LlamaFileType(value).name
    except ValueError:
        return None
    return re.sub(r"^(MOSTLY_|ALL_)", "", name)


def inspect_gguf(path: Path) -> ArtifactInfo:
    import gguf
    info = ArtifactInfo(path, "gguf")
    shards = gguf_shards(path)
    missing = [s for s in shards if not s.is_file()]
    if missing:
        info.error = f"{missing[0]}: shard missing; copy every shard next to the first"
        return info
    n_bytes = n_elem = 0
    try:
        for i, s in enumerate(shards):
            r = gguf.GGUFReader(s)
            if i == 0:
                ft = r.fields.get("general.file_type")
                info.quant_type = file_type_name(int(ft.contents())) if ft else None
                if "xvq.mix.target" in r.fields:   # a mix (docs/mix.md): gated by its main type, labelled apart
                    info.quant_type = f"{info.quant_type}-mix"
                toks = r.fields.get("tokenizer.ggml.tokens")
                if toks is not None:
                    info.tokens = toks.contents()
                    info.n_vocab = len(info.tokens)
                info.shape = gguf_shape(r, info.n_vocab)
            for t in r.tensors:
                n_bytes += int(t.n_bytes)
                n_elem += int(t.n_elements)
            del r
    except Exception as e:  # gguf-py raises ValueError/struct errors/OSError on a damaged file
        info.error = f"{path}: not a readable GGUF ({type(e).__name__}: {e}); re-create or re-download it"
        return info
    info.size_bytes = sum(s.stat().st_size for s in shards)
    info.bpw = 8.0 * n_bytes / n_elem if n_elem else None
    return info


def gguf_shape(reader, n_vocab: int | None) -> ModelShape | None:
    def field(key: str):
        f = reader.fields.get(key)
        return f.contents() if f is not None else None
    arch = field("general.architecture")
    layers, width = field(f"{arch}.block_count"), field(f"{arch}.embedding_length")
    if arch is None or layers is None or width is None:
        return None
    return ModelShape(str(arch), int(layers), int(width), n_vocab)


def inspect_folder(folder: Path, ref_params: int | None) -> ArtifactInfo:
    cfg_path = folder / "config.json"
    info = ArtifactInfo(folder, "hf")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        info.error = f"{cfg_path}: unreadable ({e}); point at a GPTQ/HF model folder"
        return info
    q = cfg.get("quantization_config") or {}
    qc_file = folder / "quantize_config.json"
    if not q and qc_file.is_file():
        q = json.loads(qc_file.read_text(encoding="utf-8")) | {"quant_method": "gptq"}
    if str(q.get("quant_method", "")).lower() == "gptq":
        info.kind = "gptq"
        info.quant_type = f"GPTQ-Int{q.get('bits', '?')}"
    else:
        info.quant_type = str(cfg.get("torch_dtype") or cfg.get("dtype") or "?").replace("bfloat16", "BF16") \
            .replace("float16", "F16").replace("float32", "F32")
    info.n_vocab = cfg.get("vocab_size")
    # a dense XVERSE GPTQ folder declares LlamaForCausalLM (the same weights); its quantize_config names the source
    source = {k: v for k, v in (q.get("xvq_source_model") or {}).items() if k in ("architectures", "model_type") and v}
    try:
        info.shape = ModelShape.of_config(cfg | source)
    except (XvqError, KeyError, TypeError, ValueError):
        info.shape = None   # a config xvq has no family for: the logits check still catches another model
    try:   # the checkpoint's own shards: a folder shipping both formats counts once
        files = weight_files(folder)
    except XvqError as e:
        info.error = str(e)
        return info
    info.size_bytes = sum(f.stat().st_size for f in files)
    if ref_params:
        info.bpw = 8.0 * info.size_bytes / ref_params
    return info


def inspect(path: Path, ref_params: int | None = None) -> ArtifactInfo:
    path = Path(path)
    if not path.exists():
        return ArtifactInfo(path, "gguf" if path.suffix == ".gguf" else "gptq",
                            error=f"{path}: not found; check the path")
    if path.is_dir():
        return inspect_folder(path, ref_params)
    if path.suffix != ".gguf":
        return ArtifactInfo(path, "gguf", error=f"{path}: neither a .gguf file nor a model folder")
    return inspect_gguf(path)


def reference_params(reference_dir: Path) -> int | None:
    """Parameter count of the reference checkpoint, from its headers (no weights loaded)."""
    from xvq.checkpoint import open_checkpoint
    try:
        ck = open_checkpoint(Path(reference_dir))
    except Exception:
        return None
    return int(sum(int(np.prod(t.shape)) for n, t in ck.tensors.items() if not n.endswith("inv_freq")))


def reference_shape(reference_dir: Path) -> ModelShape | None:
    """The reference's ModelShape; None for a config no xvq family describes (then the vocabulary
    and logits checks alone tell another model apart)."""
    from xvq.checkpoint import read_config
    try:
        return ModelShape.of_config(read_config(Path(reference_dir)))
    except (XvqError, KeyError, TypeError, ValueError):
        return None


def vocab_difference(tokens: list[str], tok) -> float:
    """Fraction of the HF tokenizer's ids whose piece differs in the GGUF token list."""
    hf = tok.convert_ids_to_tokens(list(range(min(len(tok), len(tokens)))))
    if not hf:
        return 1.0
    return sum(a != b for a, b in zip(hf, tokens)) / len(hf)
