"""Vocabulary → GGUF, encoded so that llama.cpp tokenizes exactly as Hugging Face does.

XVERSE and LLaMA both ship BPE with byte fallback over `▁`-escaped text. llama.cpp runs such
vocabularies with its SentencePiece-style tokenizer (`tokenizer.ggml.model = "llama"`): it prefixes
a space, escapes spaces to `▁` and then repeatedly merges the adjacent pair whose *result token*
has the highest score, over the whole text. Hugging Face instead pre-tokenizes (XVERSE: punctuation
isolated, digits one by one, a new piece at every `▁`) and merges pairs by *merge rank* inside
each piece. Three things make the two agree (measured in docs/tokenizer-parity.md):

* scores from merge ranks: a token's score is minus the rank of the first merge that makes it,
  so llama.cpp merges in Hugging Face's order;
* tokens Hugging Face can never produce mid-text (they would cross a pre-tokenizer boundary, or
  no merge path reaches them) are renamed to guarded placeholder text that no input can form,
  so llama.cpp cannot merge across punctuation, digits or `▁`;
* the space prefix, BOS/EOS behaviour and special tokens are written explicitly from what the
  Hugging Face tokenizer does, not from llama.cpp's defaults.

The other encoding llama.cpp offers for BPE (`gpt2` with a merges list and a pre-tokenizer type)
never adds the leading `▁` to the first word, so it cannot match these; see the docs for the numbers.
It is the native encoding of byte-level BPE (GPT-2, LLaMA-3, SmolLM: `byte_level_vocab`), written
as llama.cpp's converter writes it, with the pre-tokenizer chosen from the tokenizer's declared
splitting (xvq.llamacpp.pretok).
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from xvq.errors import XvqError

TT = gguf.TokenType
SPACE = "\u2581"  # ▁, SentencePiece's escaped space
# Private-use characters for placeholder text; the first one absent from a vocabulary guards it.
GUARDS = ("\ue000", "\ue001", "\ue002", "\uf8ff")


@dataclass
class Vocab:
    """Everything `tokenizer.ggml.*` needs, plus what was done to get parity."""
    tokens: list[str]
    scores: list[float]
    types: list[int]
    source: Path
    add_space_prefix: bool = True
    add_bos: bool | None = None
    add_eos: bool | None = None
    renamed: dict[int, str] = field(default_factory=dict)   # id -> original text (never formed by HF)
    start_only: dict[int, str] = field(default_factory=dict)  # subset of renamed: HF forms them only at text start
    notes: list[str] = field(default_factory=list)
    guard: str = GUARDS[0]
    model: str = "llama"        # tokenizer.ggml.model: llama (SentencePiece-style) or gpt2 (byte-level BPE)
    pre: str = "default"        # tokenizer.ggml.pre

    def placeholder(self, body: str) -> str:
        """Text no input can form: llama.cpp's SPM merge only builds vocabulary strings from adjacent
        vocabulary strings, and any split of guard+body+guard leaves a part that contains the guard
        but is neither a single character nor a token."""
        return f"{self.guard}{body}{self.guard}"


def pad_token(vocab: Vocab, i: int) -> str:
    # byte-level: llama.cpp's converter's name, so the GGUFs agree key for key
    return f"[PAD{i}]" if vocab.model == "gpt2" else vocab.placeholder(f"pad{i}")


# --- tokenizer.json (BPE with byte fallback: XVERSE, LLaMA-HF) ---------------------------------

def _merge_pairs(raw: list) -> list[tuple[str, str]]:
    """Merges come as "a b" strings (old format) or [a, b] lists (tokenizers >= 0.20)."""
    if raw and isinstance(raw[0], str):
        return [tuple(m.split(" ", 1)) for m in raw]
    return [(a, b) for a, b in raw]


def _is_byte_token(t: str) -> bool:
    return len(t) == 6 and t.startswith("<0x") and t.endswith(">")


def _metaspace_scheme(node: dict) -> str:
    """prepend_scheme, or what tokenizers reads the older add_prefix_space as."""
    return node.get("prepend_scheme") or ("always" if node.get("add_prefix_space", True) else "never")


def _pre_tokenizer(tj: dict, first_as: str | None = None):
    """The tokenizer's own pre-tokenizer; with `first_as`, a Metaspace that prefixes the first
    piece only does `first_as` instead. None when there is none (LLaMA-HF: the text is one word)."""
    from tokenizers import Tokenizer
    pre = tj.get("pre_tokenizer")
    if not pre:
        return None

    def patch(node):
        if isinstance(node, dict):
            if node.get("type") == "Metaspace" and first_as and _metaspace_scheme(node) == "first":
                node = dict(node, prepend_scheme=first_as, add_prefix_space=first_as != "never")
            return {k: patch(v) for k, v in node.items()}
        if isinstance(node, list):
            return [patch(v) for v in node]
        return node
    # only the pre-tokenizer matters: an empty model loads in microseconds, the real one in a second
    shell = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": patch(pre)}
    return Tokenizer.from_str(json.dumps(shell)).pre_tokenizer


def _pieces(pre, text: str) -> list[str]:
    return [p for p, _ in pre.pre_tokenize_str(text)]


def _reachability(tj: dict, tokens: list[str], pairs: list[tuple[str, str]], plain: set[int]) -> dict[str, str]:
    """'mid' for text Hugging Face can produce anywhere, 'start' only at the start of a text; tokens
    absent are never produced. A token is produced when a chain of merges builds it from single
    characters inside one pre-tokenizer piece."""
    mid_pre, first_pre = _pre_tokenizer(tj, "never"), _pre_tokenizer(tj, "first")
    candidates = {tokens[i] for i in plain}

    @functools.lru_cache(maxsize=None)
    def status(t: str) -> str | None:
        if mid_pre is None or _pieces(mid_pre, t) == [t]:
            return "mid"
        if t.startswith(SPACE) and len(t) > 1 and _pieces(first_pre, t[1:]) == [t]:
            return "start"
        return None

    reach: dict[str, str] = {}
    for t in candidates:
        if len(t) == 1:
            reach[t] = status(t) or "mid"
    changed = True
    while changed:  # alternate merges may reference tokens made by later merges
        changed = False
        for a, b in pairs:
            t = a + b
            if t in reach or a not in reach or b not in reach or t not in candidates:
                continue
            s = status(t)
            if s is not None:
                reach[t] = s
                changed = True
    return reach


def _hf_behaviour(path: Path) -> tuple[bool, bool, bool]:
    """(space prefix, add BOS, add EOS) as the Hugging Face tokenizer actually does them."""
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:   # the tokenizers library raises plain Exception on inconsistent files
        raise _damaged(path, f"the tokenizers library cannot load it ({str(e).splitlines()[0][:120]})") from None
    plain = tok.encode("a", add_special_tokens=False)
    prefix = "".join(plain.tokens).startswith(SPACE)
    with_special = tok.encode("a", add_special_tokens=True).ids
    n = len(plain.ids)
    front = next((k for k in range(len(with_special) - n + 1) if with_special[k:k + n] == plain.ids), 0)
    add_bos, add_eos = front > 0, len(with_special) - front - n > 0
    return prefix, bool(add_bos), bool(add_eos)


def _choose_guard(tokens: list[str]) -> str:
    used = set("".join(tokens))
    for g in GUARDS:
        if g not in used:
            return g
    raise XvqError("tokenizer: every private-use guard character is a token; cannot build placeholders")


def _damaged(path: Path, what: str) -> XvqError:
    return XvqError(f"{path}: {what}; restore the tokenizer.json that came with the model")


def unsupported_model(path: Path, what: str) -> XvqError:
    return XvqError(f"{path}: tokenizer model {what} is not supported; xvq converts SentencePiece-style BPE "
                    f"(XVERSE, LLaMA) and byte-level BPE (GPT-2, LLaMA-3): use the model's original tokenizer")


def load_tokenizer_json(path: Path) -> dict:
    """tokenizer.json parsed and checked for the parts xvq reads (a BPE model with a vocab)."""
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise _damaged(path, "not UTF-8 text (binary or damaged)") from None
    except json.JSONDecodeError as e:
        raise _damaged(path, f"not valid JSON, truncated or damaged ({e.msg} at line {e.lineno})") from None
    model = tj.get("model") if isinstance(tj, dict) else None
    if not isinstance(model, dict):
        raise _damaged(path, "has no tokenizer model object")
    if model.get("type", "BPE") != "BPE":   # before the BPE-shaped checks: a Unigram vocab is a list
        raise unsupported_model(path, model.get("type"))
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise _damaged(path, "its model has no vocab")
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in vocab.values()):
        raise _damaged(path, "its vocab holds ids that are not non-negative integers")
    added = tj.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) and isinstance(a.get("id"), int)
                                              and isinstance(a.get("content"), str) for a in added):
        raise _damaged(path, "added_tokens is not a list of {id, content} entries")
    if not isinstance(model.get("merges") or [], list):
        raise _damaged(path, "its merges are not a list")
    return tj


def _id_table(tj: dict) -> tuple[list[str | None], dict[int, dict]]:
    """Token text by id (None for ids nothing names), and the added tokens by id."""
    vocab: dict[str, int] = tj["model"]["vocab"]
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    tokens: list[str | None] = [None] * (max(list(vocab.values()) + list(added)) + 1)
    for piece, i in vocab.items():
        tokens[i] = piece
    for i, a in added.items():
        tokens[i] = a["content"]
    return tokens, added


def json_vocab(path: Path) -> Vocab:
    tj = load_tokenizer_json(path)
    model = tj["model"]
    if model.get("type") == "BPE" and not model.get("byte_fallback") and _declares_byte_level(tj):
        return byte_level_vocab(path, tj)
    if not model.get("byte_fallback"):
        raise unsupported_model(path, "BPE without byte fallback or a ByteLevel pre-tokenizer")
    pairs = _merge_pairs(model.get("merges") or [])
    tokens, added = _id_table(tj)
    holes = [i for i, t in enumerate(tokens) if t is None]

    rank: dict[str, int] = {}
    for r, (a, b) in enumerate(pairs):
        rank.setdefault(a + b, r)
    unk = model.get("unk_token")
    plain = {i for i, t in enumerate(tokens)
             if t is not None and i not in added and t != unk and not _is_byte_token(t)}
    reach = _reachability(tj, tokens, pairs, plain)

    v = Vocab(tokens=[], scores=[], types=[], source=path, guard=_choose_guard([t for t in tokens if t]))
    for i, t in enumerate(tokens):
        kind, score = TT.NORMAL, 0.0
        if t is None:
            t, kind = v.placeholder(f"hole{i}"), TT.UNUSED
        elif _is_byte_token(t):  # before added tokens: some trainers list the bytes as specials
            kind = TT.BYTE
        elif t == unk:
            kind = TT.UNKNOWN
        elif i in added:
            kind = TT.CONTROL if added[i].get("special") else TT.USER_DEFINED
        elif reach.get(t) != "mid":
            v.renamed[i] = t
            if reach.get(t) == "start":
                v.start_only[i] = t
            t, kind = v.placeholder(f"unreachable{i}"), TT.UNUSED
        else:
            score = -float(rank[t] + 1) if t in rank else 0.0
        v.tokens.append(t)
        v.scores.append(score)
        v.types.append(kind)
    if holes:
        v.notes.append(f"{len(holes)} ids without a token, written as unused placeholders")
    if model.get("ignore_merges"):
        v.notes.append("ignore_merges is set: whole-word vocabulary hits are not reproduced by llama.cpp")
    v.add_space_prefix, v.add_bos, v.add_eos = _hf_behaviour(path)
    if tj.get("pre_tokenizer") and "".join(_pieces(_pre_tokenizer(tj), "a,b")).count(SPACE) > 1:
        v.notes.append("the pre-tokenizer prefixes every piece with a space (Metaspace prepend_scheme always); "
                       "llama.cpp prefixes only the text, so ids differ around punctuation and digits")
    return v


# --- tokenizer.json (byte-level BPE: GPT-2, LLaMA-3, SmolLM) -------------------------------------

def _pre_steps(tj: dict) -> list[dict]:
    pre = tj.get("pre_tokenizer")
    if not pre:
        return []
    return list(pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]


def _declares_byte_level(tj: dict) -> bool:
    return any(isinstance(s, dict) and s.get("type") == "ByteLevel" for s in _pre_steps(tj))


def _unsupported_pre(path: Path, what: str) -> XvqError:
    return XvqError(f"{path}: byte-level pre-tokenizer {what} has no llama.cpp equivalent "
                    f"(xvq.llamacpp.pretok lists those it has); llama.cpp would split text differently")


def byte_level_splits(path: Path, tj: dict) -> tuple[str, ...]:
    """The tokenizer's declared splitting as regexes applied in turn (pretok's form): Split
    regexes (isolated), Digits as its digit regex, ByteLevel's own GPT-2 regex when use_regex. ByteLevel
    must come last (later steps would see byte-mapped text) and add no prefix space (llama.cpp never
    adds one)."""
    from xvq.llamacpp.pretok import GPT2
    splits: list[str] = []
    steps = _pre_steps(tj)
    for k, step in enumerate(steps):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern") or {}
            if "Regex" not in pattern:
                raise _unsupported_pre(path, f"Split on the string {pattern.get('String')!r}")
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise _unsupported_pre(path, f"Split `{pattern['Regex']}` with behavior {step.get('behavior')}"
                                             f"{' inverted' if step.get('invert') else ''}")
            splits.append(pattern["Regex"])
        elif kind == "Digits":
            splits.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if k != len(steps) - 1:
                raise _unsupported_pre(path, f"ByteLevel followed by {steps[k + 1].get('type')}")
            if step.get("add_prefix_space"):
                raise _unsupported_pre(path, "ByteLevel with add_prefix_space")
            if step.get("use_regex", True):
                splits.append(GPT2)
        else:
            raise _unsupported_pre(path, f"step {kind}")
    return tuple(splits)


def choose_pre_tokenizer(path: Path, tj: dict):
    """The llama.cpp pre-tokenizer (xvq.llamacpp.pretok) that splits as the tokenizer declares."""
    from xvq.llamacpp.pretok import matching
    splits = byte_level_splits(path, tj)
    ignore_merges = bool(tj["model"].get("ignore_merges"))
    exact, alike = matching(splits, ignore_merges)
    if exact or alike:
        return exact or alike, exact is None
    raise XvqError(f"{path}: pre-tokenizer regex `{' then '.join(splits)}` matches none of llama.cpp's "
                   f"pre-tokenizers (xvq.llamacpp.pretok); llama.cpp would split text differently, so the "
                   f"model cannot be converted faithfully")


def byte_level_vocab(path: Path, tj: dict) -> Vocab:
    """Byte-level BPE as llama.cpp's converter writes it (tokenizer.ggml.model gpt2): vocabulary
    strings as they are (byte-mapped), no scores (llama.cpp merges by the merges list), added
    tokens CONTROL when special (or looking special, as llama.cpp's converter judges them) else
    USER_DEFINED, ids nothing names as `[PAD<id>]`."""
    pre, other_merges = choose_pre_tokenizer(path, tj)
    normalizer = (tj.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):
        raise XvqError(f"{path}: normalizer {normalizer} on a byte-level BPE tokenizer is not applied by llama.cpp; "
                       f"texts it changes would tokenize differently, so the model cannot be converted faithfully")
    tokens, added = _id_table(tj)
    v = Vocab(tokens=[], scores=[], types=[], source=path, model="gpt2", pre=pre.name, add_space_prefix=False)
    if normalizer:  # Qwen2-style: most text already is NFC, and llama.cpp's converter accepts it as well
        v.notes.append("normalizer NFC is not applied by llama.cpp: text not already in NFC may tokenize differently")
    for i, t in enumerate(tokens):
        if t is None:
            t, kind = f"[PAD{i}]", TT.UNUSED
        elif i in added:
            kind = TT.CONTROL if added[i].get("special") or looks_special(t) else TT.USER_DEFINED
        else:
            kind = TT.NORMAL
        v.tokens.append(t)
        v.types.append(kind)
    if other_merges:
        v.notes.append(f"ignore_merges is {bool(tj['model'].get('ignore_merges'))} but {pre.name!r} implies "
                       f"{pre.ignore_merges}: words that are vocabulary entries may tokenize differently")
    _, v.add_bos, v.add_eos = _hf_behaviour(path)
    return v


def looks_special(token: str) -> bool:
    """llama.cpp's converter's does_token_look_special: added tokens some models forget to mark."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


# --- tokenizer.model (SentencePiece: LLaMA, Ziya) ----------------------------------------------

def spm_vocab(path: Path) -> Vocab:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    sp = spm.SentencePieceProcessor(model_file=str(path))
    proto = pb.ModelProto()
    proto.ParseFromString(path.read_bytes())
    v = Vocab(tokens=[], scores=[], types=[], source=path)
    user: list[int] = []
    for i in range(sp.vocab_size()):
        v.tokens.append(sp.id_to_piece(i))
        v.scores.append(sp.get_score(i))
        t = TT.NORMAL
        if sp.is_unknown(i):
            t = TT.UNKNOWN
        elif sp.is_control(i):
            t = TT.CONTROL
        elif sp.is_unused(i):
            t = TT.UNUSED
        elif sp.is_byte(i):
            t = TT.BYTE
        elif proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED:
            user.append(i)
        v.types.append(t)
    _user_defined_as_normal(v, user)
    norm = proto.normalizer_spec
    v.add_space_prefix = bool(norm.add_dummy_prefix)
    if norm.name not in ("identity", "") or norm.remove_extra_whitespaces:
        v.notes.append(f"normalizer {norm.name!r} (remove_extra_whitespaces={norm.remove_extra_whitespaces}) "
                       f"is not applied by llama.cpp")
    return v


def _user_defined_as_normal(v: Vocab, user: list[int]) -> None:
    """SentencePiece matches user-defined pieces (Ziya's and Chinese-LLaMA's added Chinese words)
    atomically, before any merge. llama.cpp's USER_DEFINED type would cut the text around them and
    prefix the rest with `▁`, so they are written NORMAL with the top score: llama.cpp then forms
    them first, exactly, whenever their characters can be merged into them."""
    if not user:
        return
    top = max(v.scores) + 1.0
    for i in user:
        v.types[i], v.scores[i] = TT.NORMAL, top
    formable = _formable(v.tokens)
    stuck = [v.tokens[i] for i in user if v.tokens[i] not in formable]
    if stuck:
        v.notes.append(f"{len(stuck)} user-defined pieces have no merge path in llama.cpp (e.g. {stuck[:3]}); "
                       f"texts containing them tokenize differently")


def _formable(tokens: list[str]) -> set[str]:
    """Strings llama.cpp's SPM merge can build: single characters, and tokens that split into
    two formable parts."""
    vocab = set(tokens)
    memo: dict[str, bool] = {}

    def ok(t: str) -> bool:
        if len(t) == 1:
            return True
        if t not in memo:
            memo[t] = False  # no cycles: parts are shorter
            memo[t] = t in vocab and any(ok(t[:k]) and ok(t[k:]) for k in range(1, len(t)))
        return memo[t]
    return {t for t in tokens if ok(t)}


# --- entry points ------------------------------------------------------------------------------

def read_vocab(model_dir: Path, kind: str = "auto") -> Vocab:
    model_dir = Path(model_dir)
    spm_file, json_file = model_dir / "tokenizer.model", model_dir / "tokenizer.json"
    if kind in ("spm", "auto") and spm_file.is_file():
        v = spm_vocab(spm_file)
        default_bos, default_eos = True, False
    elif json_file.is_file():
        v = json_vocab(json_file)
        default_bos, default_eos = v.add_bos, v.add_eos
    else:
        raise XvqError(f"{model_dir}: no tokenizer.json or tokenizer.model; copy the tokenizer files "
                       f"into the model folder")
    cfg = _tokenizer_config(model_dir)
    # transformers lets tokenizer_config.json override what the tokenizer files do
    v.add_bos = cfg["add_bos_token"] if isinstance(cfg.get("add_bos_token"), bool) else default_bos
    v.add_eos = cfg["add_eos_token"] if isinstance(cfg.get("add_eos_token"), bool) else default_eos
    return v


def _tokenizer_config(model_dir: Path) -> dict:
    f = model_dir / "tokenizer_config.json"
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise XvqError(f"{f}: not valid JSON ({e.msg} at line {e.lineno}); fix or remove the file") from e
    except UnicodeDecodeError:
        raise XvqError(f"{f}: not UTF-8 text (binary?); fix or remove the file") from None
    if not isinstance(cfg, dict):
        raise XvqError(f"{f}: not a JSON object; fix or remove the file")
    return cfg


def pad_vocab(v: Vocab, n_vocab: int, model_dir: Path) -> None:
    """Rows past the tokenizer (XVERSE: 100,257 tokens, 100,534 rows) become unused placeholders."""
    if len(v.tokens) > n_vocab:
        raise XvqError(f"{model_dir / 'config.json'}: vocab_size {n_vocab} is smaller than the tokenizer's "
                       f"{len(v.tokens)} entries; fix vocab_size or the tokenizer")
    for i in range(len(v.tokens), n_vocab):
        v.tokens.append(pad_token(v, i))
        if v.model != "gpt2":
            v.scores.append(0.0)
        v.types.append(TT.UNUSED)


def write_vocab(writer: gguf.GGUFWriter, v: Vocab, model_dir: Path, n_vocab: int) -> None:
    if v.model == "gpt2":
        return write_byte_level_vocab(writer, v, model_dir, n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(v.tokens)
    writer.add_token_scores(v.scores)
    writer.add_token_types(v.types)
    writer.add_add_space_prefix(v.add_space_prefix)
    special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=n_vocab)
    special.add_special_token = {"bos": bool(v.add_bos), "eos": bool(v.add_eos)}
    special.add_to_gguf(writer, quiet=True)


def write_byte_level_vocab(writer: gguf.GGUFWriter, v: Vocab, model_dir: Path, n_vocab: int) -> None:
    """The keys llama.cpp's converter writes for byte-level BPE (_set_vocab_gpt2); BOS/EOS as HF does them."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    # gguf-py warns that it cannot read LLaMA-3's two-text (pair) template; llama.cpp never uses it,
    # and BOS/EOS are set from what HF does with one text just below
    log = logging.getLogger("gguf.vocab")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    finally:
        log.setLevel(level)
    special.add_special_token = {"bos": bool(v.add_bos), "eos": bool(v.add_eos)}
    special.add_to_gguf(writer, quiet=True)
    # llama.cpp's converter copies it (SmolLM's tokenizer_config says false); llama.cpp's BPE ignores it
    prefix = _tokenizer_config(model_dir).get("add_prefix_space")
    if isinstance(prefix, bool):
        writer.add_add_space_prefix(prefix)


def add_vocab(writer: gguf.GGUFWriter, model_dir: Path, n_vocab: int, kind: str = "auto") -> dict:
    """Write tokenizer.ggml.*; returns a summary (n_tokens, renamed, notes) for the caller."""
    model_dir = Path(model_dir)
    v = read_vocab(model_dir, kind)
    n_tok = len(v.tokens)
    pad_vocab(v, n_vocab, model_dir)
    write_vocab(writer, v, model_dir, n_vocab)
    return {"n_tokens": n_tok, "n_rows": n_vocab, "source": v.source.name, "renamed": len(v.renamed),
            "model": v.model, "pre": v.pre,
            "start_only": sorted(v.start_only.values()), "add_bos": v.add_bos, "notes": v.notes}


def write_vocab_only_gguf(path: Path, model_dir: Path, n_vocab: int | None = None, kind: str = "auto",
                          vocab: Vocab | None = None) -> Path:
    """A GGUF with only the vocabulary and the minimal hyperparameters llama.cpp reads, for loading
    with `Llama(path, vocab_only=True)`: tests the tokenizer of a 100k vocab without weights.
    `vocab` writes a given (e.g. modified, for bench/) vocabulary instead of reading model_dir's."""
    model_dir, path = Path(model_dir), Path(path)
    v = vocab or read_vocab(model_dir, kind)
    n_vocab = n_vocab or len(v.tokens)
    pad_vocab(v, n_vocab, model_dir)
    w = vocab_only_writer(path, n_vocab)
    write_vocab(w, v, model_dir, n_vocab)
    finish(w)
    return path


def vocab_only_writer(path: Path, n_vocab: int, arch: str = "llama") -> gguf.GGUFWriter:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(4096)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(1)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(n_vocab)
    return w


def finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
