"""The layering the README describes, checked on the source (ast), so it cannot rot silently:
llama.cpp is reached only through xvq/llamacpp/, model families import no stage, and a stage
uses another stage only through the names that stage exports (its __init__'s __all__)."""
from __future__ import annotations

import ast
from pathlib import Path

XVQ = Path(__file__).resolve().parents[1] / "xvq"
STAGES = ("convert", "quantize", "calib_data", "validate", "release")
FOUNDATION = ("xvq.llamacpp", "xvq.models", "xvq.checkpoint", "xvq.layout", "xvq.errors", "xvq.fsio", "xvq.quiet",
              "xvq.logits",
              "xvq.identity", "xvq.stamps", "xvq.heap")


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import in a file, nested ones too."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def exported(stage: str) -> set[str]:
    tree = ast.parse((XVQ / stage / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def stage_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "xvq" and parts[1] in STAGES else None


# The one other foreign call: heap.py's mallopt in the C library (no llama.cpp there).
C_LIBRARY_ONLY = {"heap.py"}


def test_only_the_llamacpp_layer_touches_llama_cpp_or_ctypes():
    offenders = [f"{p.relative_to(XVQ.parent)}:{line} {mod}" for p in XVQ.rglob("*.py")
                 if "llamacpp" not in p.relative_to(XVQ).parts
                 for mod, _, line in imports(p)
                 if mod.split(".")[0] == "llama_cpp" or (mod.split(".")[0] == "ctypes" and
                                                         str(p.relative_to(XVQ)) not in C_LIBRARY_ONLY)]
    assert not offenders, offenders


def test_model_families_import_no_stage():
    offenders = [f"{p.name}:{line} {mod}" for p in (XVQ / "models").rglob("*.py")
                 for mod, _, line in imports(p) if stage_of(mod)]
    assert not offenders, offenders


def test_stages_use_only_the_foundation_and_each_others_public_names():
    public = {s: exported(s) for s in STAGES}
    offenders = []
    for stage in STAGES:
        for p in (XVQ / stage).rglob("*.py"):
            for mod, names, line in imports(p):
                if not mod.startswith("xvq") or mod == "xvq":   # `import xvq`: registers XVERSE with transformers
                    continue
                target = stage_of(mod)
                if target == stage or any(mod == f or mod.startswith(f + ".") for f in FOUNDATION):
                    continue
                if target and mod == f"xvq.{target}" and set(names) <= public[target]:
                    continue
                offenders.append(f"{p.relative_to(XVQ.parent)}:{line} from {mod} import {', '.join(names) or '*'}")
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds nested imports and names outside __all__ (so a green run means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from xvq.quantize.gguf import read_header\n    import ctypes\n")
    found = imports(bad)
    assert ("xvq.quantize.gguf", ["read_header"], 2) in found and ("ctypes", [], 3) in found
    assert "read_header" not in exported("quantize")
