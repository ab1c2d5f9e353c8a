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


# Text a byte-level tokenizer must get right beyond the corpus: emoji (ZWJ sequences, skin tones),
# runs of spaces/tabs/newlines, long digit runs, contractions in both cases, code.
BYTE_LEVEL_PROBES = [
    "🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 👍🏽 family 👨\u200d👩\u200d👧",
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 ١٢٣ ½ ① Ⅻ",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \nend   ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "def f(x):\n\tif x:\n\t\treturn [x ** 2 for x in range(10)]  # comment\n    \n\nint main(void) { return 0; }",
    "  leading spaces, trailing tab\t",
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? ?我想在apple工作1314151天～",
]


@pytest.fixture(scope="session", params=["llama3", "smollm"])
def byte_level_tokenizer_dir(request, tmp_path_factory) -> Path:
    """Byte-level BPE trained here on the calibration set's train split (41 languages + code) and
    the probes: LLaMA-3's layout (Split regex, ignore_merges, BOS) and SmolLM's (digits, GPT-2 regex)."""
    from xvq.calib_data import records
    from xvq.synth import byte_level_tokenizer, save_byte_level_tokenizer
    d = tmp_path_factory.mktemp(f"bytelevel-{request.param}")
    texts = [r["text"] for r in records("train")] + BYTE_LEVEL_PROBES * 5
    save_byte_level_tokenizer(byte_level_tokenizer(texts, 3000, request.param), d, request.param)
    return d


def byte_level_llama(folder: Path, tok_dir: Path, **config) -> Path:
    """A tiny LLaMA over a byte-level tokenizer: tied embeddings unless told otherwise, q/k scaled
    so a wrong rope shows in the logits."""
    import json
    import shutil
    from xvq.synth import make_checkpoint, tiny_config
    folder.mkdir(parents=True, exist_ok=True)
    for f in tok_dir.glob("*.json"):
        shutil.copy(f, folder / f.name)
    tj = json.loads((folder / "tokenizer.json").read_text())
    special = {a["content"]: a["id"] for a in tj["added_tokens"]}
    named = json.loads((folder / "tokenizer_config.json").read_text())
    n = max(list(tj["model"]["vocab"].values()) + list(special.values())) + 1
    make_checkpoint(folder, tiny_config("llama", vocab_size=n, bos_token_id=special[named["bos_token"]],
                                        eos_token_id=special[named["eos_token"]],
                                        **({"tie_word_embeddings": True, "intermediate_size": 512} | config)),
                    dtype="bfloat16", qk_scale=4.0)
    return folder
