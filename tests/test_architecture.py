"""The layering the README describes, checked on the source (ast), so it cannot rot silently:
llama.cpp is reached only through xvq/llamacpp/, model families import no stage, the stages
come in one order and each imports only the foundation and the public names (__all__) of the
stages before it, the package graph has no circle, and no stage imports a model family's module."""
from __future__ import annotations

import ast
from pathlib import Path

XVQ = Path(__file__).resolve().parents[1] / "xvq"
# in pipeline order: each may use those before it, never one after (pipeline is where they all meet)
STAGES = ("calib_data", "convert", "quantize", "validate", "release", "pipeline")
FOUNDATION = ("xvq.llamacpp", "xvq.models", "xvq.checkpoint", "xvq.layout", "xvq.errors", "xvq.fsio", "xvq.quiet",
              "xvq.identity", "xvq.stamps", "xvq.heap", "xvq.units", "xvq.interrupt", "xvq.logits", "xvq.fit")
# what families declare for the stages: the registry and the base class, never a family's own module
FAMILY_API = ("xvq.models", "xvq.models.base")


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


def stage_violations(files) -> list[str]:
    """Imports by stage code of a later stage, of another stage's private module or name, or of
    anything outside the foundation."""
    public = {s: exported(s) for s in STAGES}
    offenders = []
    for stage, p in files:
        for mod, names, line in imports(p):
            if not mod.startswith("xvq") or mod == "xvq":   # `import xvq`: registers XVERSE with transformers
                continue
            target = stage_of(mod)
            where = f"{p.relative_to(XVQ.parent) if p.is_relative_to(XVQ.parent) else p}:{line} from {mod} import {', '.join(names) or '*'}"
            if target == stage or any(mod == f or mod.startswith(f + ".") for f in FOUNDATION):
                if mod.startswith("xvq.models.") and mod not in FAMILY_API:
                    offenders.append(f"{where} (a stage names a model family)")
                continue
            if target and STAGES.index(target) > STAGES.index(stage):
                offenders.append(f"{where} (a later stage)")
            elif not (target and mod == f"xvq.{target}" and set(names) <= public[target]):
                offenders.append(where)
    return offenders


def stage_files():
    return [(stage, p) for stage in STAGES for p in (XVQ / stage).rglob("*.py")]


def test_stages_import_only_the_foundation_and_earlier_stages_public_names():
    offenders = stage_violations(stage_files())
    assert not offenders, "\n".join(offenders)


def package_graph() -> dict[str, set[str]]:
    """xvq's top-level packages and modules -> those they import."""
    def unit(module: str) -> str:
        return ".".join(module.split(".")[:2])
    graph: dict[str, set[str]] = {}
    for p in XVQ.rglob("*.py"):
        rel = p.relative_to(XVQ.parent).with_suffix("").parts
        me = unit(".".join(rel[:-1] if rel[-1] == "__init__" else rel))
        deps = graph.setdefault(me, set())
        deps |= {unit(m) for m, _, _ in imports(p) if m.startswith("xvq.") and unit(m) != me}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_circle_between_xvq_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_a_violation(tmp_path):
    """The walk finds nested imports and names outside __all__ (so a green run means something)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from xvq.quantize.gguf import read_header\n    import ctypes\n")
    found = imports(bad)
    assert ("xvq.quantize.gguf", ["read_header"], 2) in found and ("ctypes", [], 3) in found
    assert "read_header" not in exported("quantize")


def test_the_order_and_the_circle_checks_see_violations(tmp_path):
    """An upward import (validate from quantize), a family module named by a stage, and a circle."""
    (tmp_path / "quantize").mkdir()
    bad = tmp_path / "quantize" / "up.py"
    bad.write_text("from xvq.validate import validate\nfrom xvq.models.xverse import Xverse\n")
    found = stage_violations([("quantize", bad)])
    assert any("(a later stage)" in f for f in found) and any("names a model family" in f for f in found), found
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
