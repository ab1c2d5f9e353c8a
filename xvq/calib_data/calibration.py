"""The calibration text every stage measures on (imatrix and GPTQ alike): a user's file, or xvq's
multilingual sample drawn for the model's tokenizer."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xvq.calib_data.sample import DEFAULT_TOKENS, load_extra_files, sample
from xvq.errors import XvqError


@dataclass
class Calibration:
    text: str           # what llama.cpp tokenizes as one stream (a plain file exactly as given)
    texts: list[str]    # the same as paragraphs/records, for GPTQ's packed sequences
    dataset: str        # a name for metadata: the sample's id or the file's name, never a local path


def calibration(calib_file: Path | str | None = None, *, budget_tokens: int = DEFAULT_TOKENS,
                tokenizer_dir: Path | str | None = None, seed: int = 0) -> Calibration:
    if calib_file is not None:
        p = Path(calib_file)
        if not p.is_file():
            raise XvqError(f"--calib-file {p}: not found; give a UTF-8 text file or a jsonl with \"text\" fields")
        texts = [r["text"] for r in load_extra_files([p])]   # one-line errors for empty / not UTF-8 / bad jsonl
        raw = p.read_text(encoding="utf-8") if p.suffix.lower() != ".jsonl" else "\n\n".join(texts)
        return Calibration(raw, texts, p.name)
    s = sample(budget_tokens=budget_tokens, seed=seed, tokenizer_dir=tokenizer_dir)
    return Calibration(s.text, [r["text"] for r in s.records if r.get("text")], s.dataset_name)
