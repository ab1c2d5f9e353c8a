"""Tests reach ../shared/assets only through `tests/conftest.py:shared()`, which skips when the
file is absent: a test that builds the path itself passes where ../shared exists (CI) and fails
on a user's clone without it."""
from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {ROOT / "tests" / "conftest.py"}
# Names and string fragments that only a hand-built path to ../shared would use.
NAMES = {"SHARED", "XVQ_SHARED"}
FRAGMENTS = ("shared/assets", "shared\\assets", "../shared", "..\\shared", "XVQ_SHARED")
WHOLE = {"shared", "assets"}


def shared_paths_built(source: str) -> list[str]:
    """`line: token` for every code token that names ../shared other than through shared()."""
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in NAMES:
            found.append(f"{tok.start[0]}: {tok.string}")
        elif tok.type == tokenize.STRING:
            try:
                value = ast.literal_eval(tok.string)
            except (ValueError, SyntaxError):   # f-strings: check their text as written
                value = tok.string
            if isinstance(value, str) and (value in WHOLE or any(f in value for f in FRAGMENTS)):
                found.append(f"{tok.start[0]}: {tok.string}")
    return found


def test_the_check_catches_hand_built_paths():
    assert shared_paths_built('from tests.conftest import SHARED\np = SHARED / "corpus"\n')
    assert shared_paths_built('p = ROOT.parent / "shared" / "assets" / "x.txt"\n')
    assert shared_paths_built('p = Path(os.environ["XVQ_SHARED"])\n')
    assert shared_paths_built('p = Path(f"../shared/assets/{name}")\n')
    assert not shared_paths_built('p = shared("corpus", "x.txt")\nq = m.mlp.shared_experts\n')


def test_only_conftest_builds_paths_to_shared():
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 10
    offenders = {f.relative_to(ROOT).as_posix(): hits for f in files if f not in ALLOWED and f != Path(__file__)
                 for hits in [shared_paths_built(f.read_text(encoding="utf-8"))] if hits}
    assert not offenders, f"use tests.conftest.shared(...) instead: {offenders}"
