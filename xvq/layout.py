"""The output layout, one naming function for every stage.

    out/<name>/gguf/<slug>-<type>.gguf          f32/f16/bf16/q8_0 conversions and every quant
    out/<name>/imatrix/<slug>.imatrix.gguf      importance matrix (llama.cpp GGUF imatrix format)
    out/<name>/gptq/<Name>-GPTQ-Int<bits>/      GPTQ checkpoints
    out/<name>/validate/                        report.json, report.md, report.png, caches
    out/<name>/release/                         the package that goes public

File names follow XVERSE's own releases: `xverse-13b-chat-q4_k_m.gguf`, `XVERSE-13B-Chat-GPTQ-Int4`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("out")
GGUF_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")   # llama.cpp's split files: NAME-0000k-of-0000n.gguf


def is_first_gguf(path: Path | str) -> bool:
    """A whole GGUF, or the first shard of a split one (the file llama.cpp is given)."""
    m = GGUF_SHARD.search(Path(path).name)
    return m is None or int(m.group(1)) == 1


def gguf_shards(first: Path) -> list[Path]:
    """Every file of a GGUF: itself, or all shards named from the first."""
    m = GGUF_SHARD.search(first.name)
    if not m:
        return [first]
    stem, n = first.name[:m.start()], int(m.group(2))
    return [first.with_name(f"{stem}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]


def model_name(model_dir: Path | str, name: str | None = None) -> str:
    """`<name>`: explicit --name, else the model folder's name (trailing slashes ignored)."""
    if name:
        return name
    return Path(model_dir).resolve().name


def folder_name(name: str) -> str:
    """A model name fit for a folder: "SmolLM2 135M" -> "SmolLM2-135M" (case kept, as XVERSE's
    folder names keep it; spaces and path characters replaced)."""
    return re.sub(r"[^\w.+-]+", "-", name).strip("-.")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-")


def quant_tag(qtype: str) -> str:
    """'Q4_K_M' -> 'q4_k_m' (file names use lower case)."""
    return qtype.strip().lower()


@dataclass(frozen=True)
class Layout:
    name: str
    root: Path = DEFAULT_ROOT

    @classmethod
    def for_model(cls, model_dir: Path | str, name: str | None = None, root: Path | str | None = None) -> "Layout":
        return cls(model_name(model_dir, name), Path(root) if root else DEFAULT_ROOT)

    @property
    def base(self) -> Path:
        return self.root / self.name

    @property
    def gguf_dir(self) -> Path:
        return self.base / "gguf"

    @property
    def imatrix_dir(self) -> Path:
        return self.base / "imatrix"

    @property
    def gptq_root(self) -> Path:
        return self.base / "gptq"

    @property
    def validate_dir(self) -> Path:
        return self.base / "validate"

    @property
    def release_dir(self) -> Path:
        return self.base / "release"

    @property
    def mix_dir(self) -> Path:
        """Mix reports (docs/mix.md): the chosen type, bytes and sensitivity of every tensor."""
        return self.base / "mix"

    def gguf(self, qtype: str) -> Path:
        return self.gguf_dir / f"{slug(self.name)}-{quant_tag(qtype)}.gguf"

    def imatrix(self) -> Path:
        return self.imatrix_dir / f"{slug(self.name)}.imatrix.gguf"

    def gptq(self, bits: int) -> Path:
        return self.gptq_root / f"{self.name}-GPTQ-Int{bits}"

    def ggufs(self) -> list[Path]:
        """Every finished GGUF in the layout (first shard only for split files)."""
        if not self.gguf_dir.is_dir():
            return []
        return sorted(p for p in self.gguf_dir.glob("*.gguf") if not p.name.startswith(".") and is_first_gguf(p))

    def gptqs(self) -> list[Path]:
        if not self.gptq_root.is_dir():
            return []
        return sorted(p for p in self.gptq_root.iterdir() if p.is_dir() and not p.name.startswith("."))

