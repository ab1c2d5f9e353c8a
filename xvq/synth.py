"""Small synthetic checkpoints and tokenizers with the real families' structure, for the demo
model, the tests and the benchmarks (nothing is ever downloaded)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

XVERSE_SPECIALS = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]


def xverse_style_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    """BPE with byte fallback, `▁` metaspace prefixing the first word, punctuation isolated,
    digits split one by one; specials <unk>=0 <pad>=1 <|startoftext|>=2 <|endoftext|>=3,
    then the 256 byte tokens, then learned pieces (XVERSE's layout)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Punctuation(behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
    ])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=XVERSE_SPECIALS + byte_tokens,
                                  show_progress=False, limit_alphabet=max(100, vocab_size // 3))
    tok.train_from_iterator(texts, trainer)
    return tok


def save_xverse_tokenizer(tok, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         "model_max_length": 8192, **special}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
SMOLLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer(texts: Iterable[str], vocab_size: int = 2000, style: str = "llama3"):
    """Byte-level BPE (GPT-2's byte alphabet, no byte fallback, no <unk>) as real LLaMA-family
    derivatives ship it. style "llama3": LLaMA-3's Split regex then ByteLevel without its own
    regex, ignore_merges, BOS added by the post-processor; "smollm": digits split one by one then
    ByteLevel with GPT-2's regex, no BOS (SmolLM's layout, specials first)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from xvq.llamacpp.pretok import LLAMA3
    if style == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        specials = LLAMA3_SPECIALS
    elif style == "smollm":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
        specials = SMOLLM_SPECIALS
    else:
        raise ValueError(style)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[] if style == "llama3" else specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if style == "llama3":  # LLaMA-3 numbers its specials after the learned vocabulary
        tok.add_special_tokens(specials)
        bos = specials[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def save_byte_level_tokenizer(tok, folder: Path, style: str = "llama3") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    specials = LLAMA3_SPECIALS if style == "llama3" else SMOLLM_SPECIALS
    special = ({"bos_token": specials[0], "eos_token": specials[1]} if style == "llama3"
               else {"bos_token": specials[0], "eos_token": specials[0], "unk_token": specials[0]})
    extra = {} if style == "llama3" else {"add_prefix_space": False}  # as SmolLM's says
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192,
         "clean_up_tokenization_spaces": False, **extra, **special}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def tiny_config(family: str = "xverse", **kw) -> dict:
    base = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=1000, max_position_embeddings=512, hidden_act="silu", initializer_range=0.02,
                tie_word_embeddings=False, use_cache=True)
    if family == "xverse":
        base |= dict(architectures=["XverseForCausalLM"], model_type="xverse", rms_norm_eps=1e-6,
                     pad_token_id=1, bos_token_id=2, eos_token_id=3)
    elif family == "xverse-moe":  # XVERSE-MoE-A4.2B's shape, scaled down: expert width not a multiple of 256
        base |= dict(architectures=["XverseForCausalLM"], model_type="xverse", rms_norm_eps=1e-6,
                     pad_token_id=1, bos_token_id=2, eos_token_id=3, intermediate_size=160,
                     num_experts=8, moe_top_k=2, num_shared_experts=2, rope_theta=500000.0)
    elif family == "llama":
        base |= dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                     bos_token_id=1, eos_token_id=2, num_key_value_heads=2, rope_theta=10000.0)
    else:
        raise ValueError(family)
    return base | kw


def make_checkpoint(folder: Path, config: dict, *, seed: int = 0, dtype: str = "float32",
                    fmt: str = "safetensors", max_shard_size: str | None = None, qk_scale: float = 1.0,
                    router_scale: float = 1.0):
    """Random-init model of `config` saved as the family ships it. fmt: safetensors | bin.
    qk_scale enlarges q/k weights so a wrong rope permutation visibly changes the logits;
    router_scale enlarges MoE router weights so top-k routing is decisive (no near-ties)."""
    import torch
    import xvq  # noqa: F401  (registers xverse)
    from transformers import AutoConfig, AutoModelForCausalLM
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    cfg = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if qk_scale != 1.0 or router_scale != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "q_proj" in name or "k_proj" in name:
                    p.mul_(qk_scale)
                if ".mlp.router." in name:
                    p.mul_(router_scale)
    model = model.to(getattr(torch, dtype))
    if fmt == "safetensors":
        model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    else:
        save_pickle_shards(model.state_dict(), folder, n_shards=2 if max_shard_size else 1)
    # save_pretrained rewrites config.json with transformers' own view; keep the shipped form
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": dtype}, indent=2))
    return model


def save_pickle_shards(state: dict, folder: Path, n_shards: int = 2) -> None:
    """XVERSE's shipping format: pytorch_model-0000k-of-0000n.bin + pytorch_model.bin.index.json."""
    import torch
    names = list(state)
    if n_shards == 1:
        torch.save({k: v.contiguous() for k, v in state.items()}, folder / "pytorch_model.bin")
        return
    per = -(-len(names) // n_shards)
    weight_map = {}
    for k in range(n_shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
        part = {n: state[n].contiguous().clone() for n in names[k * per:(k + 1) * per]}
        torch.save(part, folder / fname)
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def write_random_safetensors(folder: Path, config: dict, *, dtype: str = "bfloat16", seed: int = 0,
                             shard_bytes: int = 0, std: float = 0.02) -> list[Path]:
    """A random checkpoint of `config` written tensor by tensor straight to safetensors (no
    torch model in memory, so multi-GB checkpoints for benchmarks are cheap to make). Shards
    with an index when `shard_bytes` is set, named as save_pretrained names them."""
    import numpy as np
    from xvq.models import family_for
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config | {"torch_dtype": dtype}, indent=2))
    shapes = family_for(config).expected_shapes()
    st_dtype, itemsize = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4)}[dtype]
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * itemsize
        if shard_bytes and groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    rng = np.random.default_rng(seed)
    files = []
    for k, names in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        header, offset = {}, 0
        for name in names:
            n = int(np.prod(shapes[name])) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps({"__metadata__": {"format": "pt"}} | header).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / fname, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            for name in names:
                shape = shapes[name]
                rows_per = max(1, (16 << 20) // max(1, shape[-1]))  # 16M values at a time
                n_rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                for r in range(0, n_rows, rows_per):
                    m = min(rows_per, n_rows - r)
                    if len(shape) == 1:  # norms: around 1, as trained models have them
                        block = (1.0 + std * rng.standard_normal(shape, dtype=np.float32))
                    else:
                        block = std * rng.standard_normal((m, shape[-1]), dtype=np.float32)
                    if dtype == "bfloat16":
                        block = (block.view(np.uint32) >> 16).astype(np.uint16)
                    f.write(block.astype({"float16": np.float16}.get(dtype, block.dtype), copy=False).tobytes())
        files.append(folder / fname)
    if len(groups) > 1:
        weight_map = {n: files[k].name for k, names in enumerate(groups) for n in names}
        total = sum(int(np.prod(s)) * itemsize for s in shapes.values())
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return files
