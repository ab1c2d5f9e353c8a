"""Shared fixtures: tiny checkpoints built here (no downloads), ../shared when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XVQ_SHARED", ROOT.parent / "shared")) / "assets"
DEMO = ROOT / "xvq" / "demo" / "model"

# Text the tests train their small tokenizers on: the project's own calibration text when it
# exists, else a fixed multilingual paragraph set (enough for a few hundred merges).
FALLBACK_TEXT = [
    "Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.",
    "The quick brown fox jumps over the lazy dog 1234567890 times; punctuation: (a, b) [c] {d} \"e\" 'f'!",
    "西游记是中国古典四大名著之一，讲述了唐僧师徒四人西天取经的故事。孙悟空神通广大，七十二变。",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "Москва — столица России. Der schnelle braune Fuchs. El zorro marrón rápido. Le renard brun rapide.",
    "def main():\n    for i in range(10):\n        print(i * 2)\n\nint main(void) { return 0; }",
] * 20


def shared(*parts: str, optional: bool = False) -> Path | None:
    """The one way tests reach ../shared/assets (tests/test_shared_access.py holds them to it):
    skips the test when the file is absent, or returns None when `optional`."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        if optional:
            return None
        pytest.skip(f"needs ../shared/assets/{'/'.join(parts)}")
    return p


def training_text() -> list[str]:
    """The hand-written part of the calibration set's train split: short paragraphs in every
    language (the shipped real text is 30 times larger; test tokenizers need no more)."""
    try:
        from xvq.calib_data import records
        texts = [r["text"] for r in records("train") if r["source"] == "hand-written"]
        if texts:
            return texts
    except Exception:
        pass
    return FALLBACK_TEXT


@pytest.fixture(scope="session")
def xverse_tokenizer_dir(tmp_path_factory) -> Path:
    from xvq.synth import save_xverse_tokenizer, xverse_style_tokenizer
    d = tmp_path_factory.mktemp("xverse-tok")
    save_xverse_tokenizer(xverse_style_tokenizer(training_text(), 1200), d)
    return d


@pytest.fixture(scope="session")
def tiny_xverse(tmp_path_factory, xverse_tokenizer_dir) -> Path:
    """XVERSE-shaped, padded vocab (config rows > tokenizer entries), sharded pickle .bin,
    q/k scaled so a wrong rope permutation shows in the logits."""
    import json
    import shutil
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("tiny-xverse")
    for f in xverse_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    n_tok = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    make_checkpoint(d, tiny_config("xverse", vocab_size=n_tok + 37), fmt="bin", max_shard_size="1MB", qk_scale=4.0)
    return d


@pytest.fixture(scope="session")
def tiny_llama_gqa(tmp_path_factory, xverse_tokenizer_dir) -> Path:
    """LLaMA with GQA (4 heads, 2 kv heads), bf16 safetensors, SentencePiece-free (tokenizer.json)."""
    import json
    import shutil
    from xvq.synth import make_checkpoint, tiny_config
    d = tmp_path_factory.mktemp("tiny-llama")
    for f in xverse_tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    n_tok = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    make_checkpoint(d, tiny_config("llama", vocab_size=n_tok, bos_token_id=2, eos_token_id=3),
                    dtype="bfloat16", qk_scale=4.0)
    return d
