"""Importing xvq registers XVERSE with transformers' Auto classes: real XVERSE folders (whose
config.json has an auto_map pointing at remote code) load without trust_remote_code, and run
the same as transformers' own LlamaForCausalLM on the same weights. The real configs parse
through xvq's family registry with the right shapes."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xvq  # noqa: F401  (the registration under test)
from tests.conftest import ROOT, shared
from xvq.errors import XvqError
from xvq.models import families, family_for

AUTO_MAP = {"AutoConfig": "configuration_xverse.XverseConfig",
            "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"}


@pytest.fixture(scope="module")
def xverse_with_auto_map(tiny_xverse, tmp_path_factory) -> Path:
    """The tiny XVERSE checkpoint with config.json shaped like the shipped ones: auto_map to
    remote code that is not there (so any attempt to use it fails)."""
    d = Path(shutil.copytree(tiny_xverse, tmp_path_factory.mktemp("reg") / "XVERSE-Tiny"))
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({"architectures": ["XverseForCausalLM"], "auto_map": AUTO_MAP} | cfg))
    assert not list(d.glob("*.py"))
    return d


def llama_reference_logits(folder: Path, ids: list[int]) -> np.ndarray:
    """transformers' own Llama, configured by hand from the same config.json numbers."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    c = json.loads((folder / "config.json").read_text())
    cfg = LlamaConfig(hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
                      num_hidden_layers=c["num_hidden_layers"], num_attention_heads=c["num_attention_heads"],
                      num_key_value_heads=c.get("num_key_value_heads", c["num_attention_heads"]),
                      vocab_size=c["vocab_size"], max_position_embeddings=c["max_position_embeddings"],
                      rms_norm_eps=c["rms_norm_eps"], tie_word_embeddings=False, hidden_act="silu")
    model = LlamaForCausalLM.from_pretrained(folder, config=cfg, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_auto_classes_load_xverse_without_remote_code(xverse_with_auto_map):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    d = xverse_with_auto_map
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "xverse" and type(cfg).__module__.startswith("xvq.")
    assert cfg.rms_norm_eps == 1e-6 and cfg.num_hidden_layers == 2
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
    assert type(model).__module__.startswith("xvq.")
    explicit = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, trust_remote_code=False)
    ids = [int(i) for i in np.random.RandomState(3).randint(4, 900, 48)]
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0].numpy()
        got2 = explicit(torch.tensor([ids])).logits[0].numpy()
    ref = llama_reference_logits(d, ids)
    np.testing.assert_array_equal(got, got2)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_registration_when_xvq_is_imported_before_transformers(xverse_with_auto_map):
    """The lazy path: `import xvq` first (transformers not loaded), then transformers."""
    code = ("import sys, xvq; assert 'transformers' not in sys.modules\n"
            "from transformers import AutoConfig\n"
            f"c = AutoConfig.from_pretrained({str(xverse_with_auto_map)!r})\n"
            "print(type(c).__module__, type(c).__name__, c.num_attention_heads)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["xvq.models.configuration_xverse", "XverseConfig", "4"]   # registered by xvq.models.hf


# --- the shipped configs through the family registry -------------------------------------------

# name -> (family, gguf arch, n_layer, n_embd, n_head, n_ff, n_vocab, n_ctx), from the model cards
REAL = {
    "XVERSE-7B-Chat": ("xverse", "xverse", 32, 4096, 32, 11008, 100534, 8192),
    "XVERSE-13B": ("xverse", "xverse", 40, 5120, 40, 13824, 100534, 8192),
    "XVERSE-13B-Chat-v1": ("xverse", "xverse", 40, 5120, 40, 13824, 100278, 8192),
    "XVERSE-13B-256K": ("xverse", "xverse", 40, 5120, 40, 13824, 100534, 32768),
    "XVERSE-65B": ("xverse", "xverse", 80, 8192, 64, 22016, 100534, 16384),
    "XVERSE-65B-Chat": ("xverse", "xverse", 80, 8192, 64, 22016, 100534, 16384),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dense_configs_parse(name):
    cfg = json.loads((shared("xverse-configs", name) / "config.json").read_text())
    fam = family_for(cfg)
    family, arch, n_layer, n_embd, n_head, n_ff, n_vocab, n_ctx = REAL[name]
    hp = fam.hp
    assert (fam.name, fam.gguf_arch) == (family, arch)
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_head_kv, hp.n_ff, hp.n_vocab, hp.n_ctx) == \
        (n_layer, n_embd, n_head, n_head, n_ff, n_vocab, n_ctx)
    assert hp.rms_eps == 1e-6 and hp.rope_theta == 10000.0 and not hp.tie_embeddings
    # the checkpoint shapes the config implies (what check_shapes holds a checkpoint to)
    shapes = fam.expected_shapes()
    assert shapes["model.embed_tokens.weight"] == (n_vocab, n_embd)
    assert shapes["lm_head.weight"] == (n_vocab, n_embd)
    assert shapes[f"model.layers.{n_layer - 1}.mlp.down_proj.weight"] == (n_embd, n_ff)


def test_real_configs_load_in_transformers_without_remote_code(tmp_path):
    from transformers import AutoConfig
    for name in REAL:
        d = tmp_path / name
        d.mkdir()
        shutil.copy(shared("xverse-configs", name) / "config.json", d / "config.json")
        c = AutoConfig.from_pretrained(d)
        assert (c.model_type, c.num_hidden_layers, c.vocab_size) == ("xverse", REAL[name][2], REAL[name][6])


def test_moe_config_claimed_or_named():
    cfg = json.loads((shared("xverse-configs", "XVERSE-MoE-A4.2B") / "config.json").read_text())
    moe = [f for f in families() if f.accepts(cfg) and "moe" in f.name.lower()]
    if not moe:
        with pytest.raises(XvqError, match="XverseForCausalLM"):
            family_for(cfg)
        return
    fam = family_for(cfg)
    assert type(fam) is moe[0]
    hp = fam.hp
    assert (hp.n_layer, hp.n_embd, hp.n_head, hp.n_vocab) == (28, 2560, 32, 100534)
    assert (hp.n_expert, hp.n_expert_used, hp.n_shared_expert) == (64, 6, 2)
    assert hp.rope_theta == 500000.0 and hp.rms_eps == 1e-6


def test_dense_family_does_not_claim_moe():
    from xvq.models.xverse import Xverse
    cfg = {"architectures": ["XverseForCausalLM"], "model_type": "xverse", "num_experts": 64}
    assert not Xverse.accepts(cfg)
    assert Xverse.accepts({"architectures": ["XverseForCausalLM"], "model_type": "xverse"})


def test_unknown_architecture_names_supported_ones():
    with pytest.raises(XvqError) as e:
        family_for({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, "x/config.json")
    msg = str(e.value.message)
    assert "x/config.json" in msg and "MixtralForCausalLM" in msg
    assert "LlamaForCausalLM" in msg and "XverseForCausalLM" in msg and "\n" not in msg

