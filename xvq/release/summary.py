"""How `xvq release` ends: where everything is, how to publish it, and a table of what was made
and how good it is (from report.json)."""
from __future__ import annotations

from pathlib import Path

from xvq.release import publish
from xvq.release.card import human_size

HEADER = ("artifact", "type", "size", "bits/w", "mean KLD", "PPL ratio", "gate")


def _num(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def artifact_rows(report: dict) -> list[tuple[str, ...]]:
    rows = []
    for a in report["artifacts"]:
        rows.append((Path(a["path"]).name, str(a.get("quant_type") or a.get("kind") or "?"),
                     human_size(a["size_bytes"]) if a.get("size_bytes") is not None else "n/a",
                     _num(a.get("bpw"), ".2f"), _num(a.get("kld_mean"), ".5f"), _num(a.get("ppl_ratio"), ".4f"),
                     "pass" if a.get("passed") else "FAIL"))
    return rows


def table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(r):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return [line(HEADER), line(tuple("-" * w for w in widths)), *map(line, rows)]


def summary_lines(report: dict, package: Path, report_md: Path, logs: Path | None = None) -> list[str]:
    """Where things are and how to publish them, then the quality table last, where the eye lands."""
    out = [f"release folder: {package}", f"report:         {report_md}"]
    if logs is not None:
        out += [f"logs:           {logs}  (--verbose prints them instead)"]
    folders = publish.release_folders(package) if Path(package).is_dir() else []
    if folders:
        out += ["", f"to publish (xvq uploads nothing; replace {publish.ORG} with your Hugging Face / ModelScope account):"]
        for f in folders:
            out += [f"  {cmd}" for cmd in publish.upload_commands(f)]
    return out + [""] + table(artifact_rows(report))
