"""Python as a user without xvq runs it: a fresh process (`-I -S`: no PYTHON* variables, no
current folder, no .pth files, hence no editable install of xvq) whose sys.path holds the
environment's site-packages and nothing of this repository; it asserts that xvq cannot be
imported before doing anything else."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PRELUDE = r'''
import importlib.util, os, sys
sys.path += [p for p in os.environ["SITE_PACKAGES_ONLY"].split(os.pathsep) if p not in sys.path]
spec = importlib.util.find_spec("xvq")
assert spec is None, f"xvq is importable here ({spec.origin})"
'''

LOGITS = r'''
import json
import torch
from transformers import AutoModelForCausalLM
folder, ids_file, out_file, remote = sys.argv[1:5]
model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", trust_remote_code=remote == "remote").eval()
with torch.no_grad():
    logits = torch.cat([model(torch.tensor([ids])).logits.float() for ids in json.load(open(ids_file))])
assert not any(m == "xvq" or m.startswith("xvq.") for m in sys.modules)
torch.save({"logits": logits, "class": f"{type(model).__module__}.{type(model).__name__}"}, out_file)
'''


def run_without_xvq(code: str, args: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    import site
    # the parent's site-packages (a venv's: with -S the child would not find them itself)
    env["SITE_PACKAGES_ONLY"] = os.pathsep.join(site.getsitepackages())
    env |= {"HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-I", "-S", "-c", PRELUDE + code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def logits_without_xvq(folder: Path, batches, work: Path, remote_code: bool = False):
    """(logits [batch, seq, vocab] float32, the model's class as module.name) as plain transformers
    computes them for `folder` in a fresh process without xvq."""
    import torch
    work.mkdir(parents=True, exist_ok=True)
    ids_file, out_file = work / "ids.json", work / "logits.pt"
    ids_file.write_text(json.dumps([[int(i) for i in b] for b in batches]))
    res = run_without_xvq(LOGITS, [str(folder), str(ids_file), str(out_file), "remote" if remote_code else "plain"],
                          work)
    assert res.returncode == 0, res.stderr[-4000:]
    data = torch.load(out_file)
    return data["logits"], data["class"]
