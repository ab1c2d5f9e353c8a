"""report.json (versioned schema, docs/report-schema.md), report.md (a table a model card pastes)
and report.png (perplexity ratio and KLD against bits per weight)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from xvq.errors import XvqError
from xvq.fsio import atomic_output
from xvq.validate import gate
from xvq.validate.metrics import perplexity

SCHEMA_VERSION = 2   # 2: competence per language; headline means over competent languages


def build_report(*, reference_dir: Path, reference_gguf, ref, windows, text_source: str, entries: list[dict],
                 overrides: dict, top_k: int, max_tokens, input_problem: str | None,
                 model_name: str | None = None, competence: dict | None = None, backend: dict | None = None) -> dict:
    import xvq
    from xvq.validate.competence import COMPETENCE_RATIO
    ref_langs = {}
    for lang, (wa, wb) in windows.spans.items():
        row = {"n_tokens": windows.n_tokens[lang], "n_windows": wb - wa, "perplexity": None}
        if ref is not None and wb - wa:
            a, b = windows.position_span(lang)
            row["perplexity"] = perplexity(ref.rows.nll[a:b])
        row["competence"] = (competence or {}).get(lang)
        ref_langs[lang] = row
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": f"xvq {xvq.__version__}",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reference": {
            "path": str(reference_dir),
            "name": model_name or Path(reference_dir).name,
            "scored_with": (backend or {}).get("backend", "llama.cpp" if reference_gguf else "transformers"),
            "backend_reason": (backend or {}).get("reason"),
            "device": (backend or {}).get("device"),
            "gguf": (backend or {}).get("gguf") or (Path(reference_gguf).name if reference_gguf else None),
            "perplexity": perplexity(ref.rows.nll) if ref is not None else None,
            "per_language": ref_langs,
            "cache": str(ref.cache_file) if ref is not None and ref.cache_file else None,
        },
        "settings": {
            "text": text_source,
            "ctx": windows.ctx,
            "scored_per_window": windows.per_window,
            "n_windows": windows.n_windows,
            "n_tokens_scored": windows.n_windows * windows.per_window,
            "max_tokens": max_tokens,
            "add_bos": windows.add_bos,
            "top_k": top_k,
            "min_language_windows": 2,
            "competence_ratio": COMPETENCE_RATIO,
            "headline_languages": _headline(windows, competence or {}),
        },
        "thresholds": {"overrides": {k: v for k, v in overrides.items() if v is not None},
                       "defaults": {q: t.as_dict() for q, t in gate.DEFAULTS.items()}},
        "input_problem": input_problem,
        "artifacts": entries,
        "passed": bool(entries) and all(e["passed"] for e in entries),
    }


def _headline(windows, competence: dict) -> list[str]:
    """The languages the artifacts' headline means cover (see core.headline_positions)."""
    good = [lang for lang, c in competence.items() if c and c["competent"]]
    return good if len(windows.spans) > 1 and good else list(windows.spans)


def load_report(path: Path | str) -> dict:
    """report.json (or its folder) as a dict, after checking the schema version."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise XvqError(f"{path}: cannot read the validation report ({e}); run `xvq validate` again") from e
    v = data.get("schema_version") if isinstance(data, dict) else None
    if v != SCHEMA_VERSION:
        raise XvqError(f"{path}: report schema_version {v!r}, this xvq reads {SCHEMA_VERSION}; "
                       f"re-run `xvq validate` with this version")
    return data


# ---------------------------------------------------------------- markdown

def _f(x, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def _size(n) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def markdown(data: dict) -> str:
    s = data["settings"]
    ref = data["reference"]
    lines = [
        "| file | kind | type | size | bits/weight | PPL | PPL ratio | mean KLD | KLD p99 | same top-1 "
        "| tokenizer mismatch | gate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in data["artifacts"]:
        lines.append(
            f"| {Path(a['path']).name} | {a['kind']} | {a['quant_type'] or '?'} | {_size(a['size_bytes'])} "
            f"| {_f(a['bpw'], '.2f')} | {_f(a['perplexity'], '.4f')} | {_f(a['ppl_ratio'], '.4f')} "
            f"| {_f(a['kld_mean'], '.5f')} | {_f(a['kld_p99'], '.4f')} "
            f"| {_f(a['top1_agreement'] * 100 if a['top1_agreement'] is not None else None, '.2f')}% "
            f"| {_f(a['token_mismatch_rate'], '.4f')} | {'pass' if a['passed'] else 'FAIL'} |")
    how = ref['scored_with'] + (f" on {ref['device']}" if ref.get("device") else "") + \
        (f"; {ref['backend_reason']}" if ref.get("backend_reason") else "")
    out = [f"Reference: `{ref.get('name') or Path(ref['path']).name}` ({how}), perplexity "
           f"{_f(ref['perplexity'], '.4f')}; {s['n_windows']} windows of {s['ctx']} tokens, "
           f"{s['n_tokens_scored']} tokens scored (second half of each window); text: {s['text']}; "
           f"KLD on the reference's top-{s['top_k']} tokens plus the rest as one bin.", "", *lines]
    langs = list(ref["per_language"])
    scored = [lang for lang in langs if ref["per_language"][lang]["n_windows"] >= 2]
    if len(langs) > 1 and data["artifacts"]:
        names = [Path(a["path"]).name for a in data["artifacts"]]
        weak = [lang for lang in scored if (ref["per_language"][lang].get("competence") or {}).get("competent") is False]
        none_competent = bool(weak) and len(weak) == len(scored)   # core.validate gates every language then
        out += ["", "Perplexity ratio by language (✗: fails its gate):", "",
                "| language | reference PPL | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        for lang in scored:
            cells = []
            for a in data["artifacts"]:
                m = (a.get("per_language") or {}).get(lang)
                cells.append("n/a" if not m else f"{m['ppl_ratio']:.4f}" + ("" if m["passed"] else " ✗"))
            note = " (not competent)" if lang in weak and not none_competent else ""
            out.append(f"| {lang}{note} | {_f(ref['per_language'][lang]['perplexity'], '.3f')} | "
                       + " | ".join(cells) + " |")
        if none_competent:
            out += ["", f"The reference is competent on none of the languages (its NLL is above "
                        f"{s.get('competence_ratio')} of each text's own unigram model: undertrained or random "
                        f"weights?), so every language is gated and in the headline means."]
        elif weak:
            out += ["", f"Not competent (reference NLL above {s.get('competence_ratio')} of the text's own unigram "
                        f"model; reported, not gated, not in the headline means): {', '.join(weak)}."]
        unscored = [lang for lang in langs if lang not in scored]
        if unscored:
            out += ["", f"n/a (fewer than two windows of text): {', '.join(unscored)}."]
    checks = [(Path(a["path"]).name, a["kld_check"]) for a in data["artifacts"]
              if a.get("kld_check") and a["kld_check"]["n_positions"]]
    if checks:
        out += ["", f"Top-{s['top_k']} KLD against the full-vocabulary KLD on the same positions:", ""]
        out += [f"- `{name}`: {c['kld_topk']:.6g} vs {c['kld_full']:.6g} ({c['n_positions']} positions)"
                for name, c in checks]
    fails = [a for a in data["artifacts"] if not a["passed"]]
    if fails:
        out += ["", "Failures:", ""]
        out += [f"- `{Path(a['path']).name}`: " + "; ".join(a["reasons"]) for a in fails]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- plot

def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [a for a in data["artifacts"] if a["bpw"] is not None and a["ppl_ratio"] is not None]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for a in pts:
        color = "tab:green" if a["passed"] else "tab:red"
        label = a["quant_type"] or Path(a["path"]).name
        ax1.scatter(a["bpw"], a["ppl_ratio"], color=color)
        ax1.annotate(label, (a["bpw"], a["ppl_ratio"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        kld = max(a["kld_mean"], 1e-7)
        ax2.scatter(a["bpw"], kld, color=color)
        ax2.annotate(label, (a["bpw"], kld), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xlabel="bits per weight", ylabel="perplexity / reference", title="Perplexity ratio")
    ax2.set(xlabel="bits per weight", ylabel="mean KL divergence", title="KL divergence", yscale="log")
    name = data["reference"].get("name") or Path(data["reference"]["path"]).name
    fig.suptitle(f"{name}: quality against bits per weight (red: fails the gate)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(report) -> None:
    d = report.report_dir
    with atomic_output(d / "report.json") as tmp:
        tmp.write_text(json.dumps(report.data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with atomic_output(d / "report.md") as tmp:
        tmp.write_text(markdown(report.data), encoding="utf-8")
    with atomic_output(d / "report.png") as tmp:
        plot(report.data, tmp)
