"""`xvq release`: convert → imatrix → GGUF types (and tiers) → GPTQ → validate → package, each
step skipped when its inputs and options are unchanged (stamps), so a rerun resumes after a
failure and does almost nothing after a success."""
from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from xvq.checkpoint import read_config
from xvq.fsio import atomic_output, atomic_write_text, sweep_tree
from xvq.identity import source_identity
from xvq.layout import Layout, is_first_gguf
from xvq.models import family_for
from xvq.fit import fit_table
from xvq.pipeline.tiers import build_tiers
from xvq.release import card, package, publish
from xvq.stamps import Stamps, fingerprint, sha256_file
from xvq.units import parse_size

# XVERSE's own released GGUF set, and its GPTQ Int4/Int8.
DEFAULT_GGUF_TYPES = ("Q2_K", "Q3_K_M", "Q4_0", "Q4_K_M", "Q5_0", "Q5_K_M", "Q6_K", "Q8_0")
DEFAULT_GPTQ_BITS = (4, 8)
DEFAULT_SPLIT = "48G"  # Hugging Face refuses single files over 50 GB


@dataclass
class ReleaseResult:
    package: Path
    included: list[str] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None     # validate/report.json
    logs: Path | None = None       # each step's output when quiet (xvq.quiet)


def tool_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for dist in ("xvq", "llama-cpp-python", "gguf", "transformers", "torch", "gptqmodel"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def model_hash(model_dir: Path) -> str:
    """sha256 over the checkpoint's weight files' own sha256s (cached beside the stamps by fingerprint)."""
    from xvq.checkpoint import weight_files
    from xvq.identity import file_hash
    import hashlib
    h = hashlib.sha256()
    for f in weight_files(model_dir):
        h.update(f"{f.name}:{file_hash(f)}\n".encode())
    return h.hexdigest()


def build_ggufs(model_dir: Path, layout: Layout, types: list[str], stamps: Stamps, log,
                calib_tokens: int | None = None, gpu_layers: str | int | None = "auto",
                tiers: tuple[str, ...] = ()) -> list[Path]:
    from xvq.llamacpp import parse_type
    from xvq.quantize import DEFAULT_CALIB_TOKENS, ImatrixSettings, make_ggufs
    qts = [parse_type(t) for t in types]
    imatrix = ImatrixSettings(calib_tokens=calib_tokens or DEFAULT_CALIB_TOKENS, gpu_layers=gpu_layers)
    outs = make_ggufs(model_dir, qts, layout, [layout.gguf(q.name) for q in qts], imatrix=imatrix,
                      stamps=stamps, reuse_outputs=True, progress=False, log=log)   # a bar per step: xvq.quiet
    return outs + build_tiers(model_dir, layout, tiers, stamps, log, calib_tokens)


def build_gptqs(model_dir: Path, layout: Layout, bits: list[int], stamps: Stamps, src_fp,
                calib_tokens: int | None = None) -> list[Path]:
    if not bits:
        return []
    from xvq.quantize import GptqSettings, quantize_gptq
    outs = []
    for b in bits:
        out = layout.gptq(b)
        settings = GptqSettings(bits=b, **({"calib_tokens": calib_tokens} if calib_tokens else {}))
        stamps.run(f"gptq-int{b}", {"model": src_fp, "settings": settings.__dict__}, [out],
                   lambda out=out, settings=settings: quantize_gptq(model_dir, out, settings))
        outs.append(out)
    return outs


def run_validate(model_dir: Path, layout: Layout, artifacts: list[Path], stamps: Stamps, src_fp, options: dict) -> dict:
    from xvq.validate import load_report, validate
    report_json = layout.validate_dir / "report.json"
    inputs = {"model": src_fp, "artifacts": fingerprint(artifacts), "options": options}
    stamps.run("validate", inputs, [report_json],
               lambda: validate(model_dir, artifacts, report_dir=layout.validate_dir, model_name=layout.name,
                                layout=layout, **options))
    return load_report(report_json)


def split_report(data: dict, keep: list[str]) -> dict:
    """The report limited to some artifacts (one card per artifact family)."""
    return data | {"artifacts": [a for a in data["artifacts"] if a["path"] in keep]}


def build_package(model_dir: Path, layout: Layout, data: dict, ggufs: list[Path], gptqs: list[Path],
                  split_bytes: int, src_hash: str, log) -> tuple[list[str], list[dict]]:
    from xvq.validate import markdown
    config = read_config(model_dir)
    fam = family_for(config)
    base_model = config.get("_name_or_path") or layout.name
    entries = {a["path"]: a for a in data["artifacts"]}
    passed = [p for p in ggufs + gptqs if entries.get(str(p), {}).get("passed")]
    left_out = [{"path": str(p), "reasons": entries.get(str(p), {}).get("reasons", ["not validated"]),
                 "metrics": {k: entries.get(str(p), {}).get(k) for k in ("perplexity", "ppl_ratio", "kld_mean", "top1_agreement")}}
                for p in ggufs + gptqs if p not in passed]
    plot = layout.validate_dir / "report.png"
    with atomic_output(layout.release_dir, is_dir=True) as root:
        gguf_dir = root / f"{layout.name}-GGUF"
        kept_ggufs = [p for p in ggufs if p in passed]
        if kept_ggufs:
            placed = [f for p in kept_ggufs for f in package.place_gguf(p, gguf_dir, split_bytes)]
            first = [f for f in placed if is_first_gguf(f)]
            if plot.is_file():
                shutil.copy(plot, gguf_dir / "report.png")
            best = max(kept_ggufs, key=lambda p: p.stat().st_size if "q4_k_m" not in p.name else 1e30)
            (gguf_dir / "Modelfile").write_text(card.modelfile(fam, next(f.name for f in first if f.name.startswith(best.stem))))
            table = markdown(split_report(data, [str(p) for p in kept_ggufs]))
            (gguf_dir / "README.md").write_text(card.gguf_card(fam, layout.name, base_model, first, table,
                                                               "report.png" if plot.is_file() else None, best.name),
                                                encoding="utf-8")
        for g in (p for p in gptqs if p in passed):
            dst = root / g.name
            package.copy_tree(g, dst)
            if plot.is_file():
                shutil.copy(plot, dst / "report.png")
            bits = int(g.name.rsplit("Int", 1)[-1])
            (dst / "README.md").write_text(card.gptq_card(fam, layout.name, base_model, g, bits,
                                                          markdown(split_report(data, [str(g)])),
                                                          "report.png" if plot.is_file() else None), encoding="utf-8")
        for folder in publish.release_folders(root):
            publish.write_hub_files(folder)
        package.write_sums(root)
        package.write_manifest(root, manifest_meta(model_dir, layout, data, src_hash, left_out))
    log(f"package: {layout.release_dir}")
    return [str(p) for p in passed], left_out


def manifest_meta(model_dir: Path, layout: Layout, data: dict, src_hash: str, left_out: list[dict]) -> dict:
    imat = layout.imatrix()
    imatrix = None
    if imat.is_file():
        from xvq.quantize import Imatrix
        im = Imatrix.load(imat)
        imatrix = {"file": imat.name, "sha256": sha256_file(imat), "dataset": im.datasets[0] if im.datasets else None,
                   "chunks": im.chunk_count, "entries": len(im)}
    fits = {}
    for p in sorted(layout.gguf_dir.glob("*.gguf")):
        if p.name.startswith("."):
            continue
        fits[p.name] = fit_table(p)
    return {"schema_version": 1, "name": layout.name, "source_model": {"path": model_dir.name, "sha256": src_hash},
            "tool_versions": tool_versions(), "calibration": data.get("settings", {}).get("text"),
            "imatrix": imatrix, "validate_report": "report.json schema v%s" % data.get("schema_version"),
            "computed_on": {"reference": {k: data.get("reference", {}).get(k) for k in ("scored_with", "device")},
                            "artifacts": {Path(a["path"]).name: a.get("device") for a in data.get("artifacts", [])}},
            "left_out": left_out, "laptop_fit": fits}


def release(model_dir: Path | str, *, name: str | None = None, out_root: Path | str | None = None,
            gguf_types=DEFAULT_GGUF_TYPES, gptq_bits=DEFAULT_GPTQ_BITS, force: bool = False,
            split_max_size: str = DEFAULT_SPLIT, validate_options: dict | None = None,
            calib_tokens: int | None = None, tiers: tuple[str, ...] = (), log=print,
            verbose: bool | None = None) -> ReleaseResult:
    """verbose None: every library prints as it likes (for callers with their own logging);
    False: one progress bar per step, each step's output in out/<name>/logs/; True: all of it."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    family_for(config, str(model_dir / "config.json"))  # fail early on an unsupported model
    layout = Layout.for_model(model_dir, name, out_root)
    sweep_tree(layout.base)                # partials of killed runs
    stamps = Stamps(layout.base / ".stamps", force)
    if verbose is None:
        return _release(model_dir, layout, stamps, gguf_types, gptq_bits, split_max_size, validate_options,
                        calib_tokens, log, tiers)
    from xvq.quiet import Steps, set_verbosity
    set_verbosity(verbose)
    with Steps(stamps, layout.base / "logs", verbose) as steps:
        r = _release(model_dir, layout, steps, gguf_types, gptq_bits, split_max_size, validate_options,
                     calib_tokens, log, tiers)
    r.logs = None if verbose else layout.base / "logs"
    return r


def _release(model_dir: Path, layout: Layout, stamps, gguf_types, gptq_bits, split_max_size: str,
             validate_options: dict | None, calib_tokens: int | None, log, tiers=()) -> ReleaseResult:
    src_fp = source_identity(model_dir, stamps.cache)   # by content: every step after a changed source reruns
    ggufs = build_ggufs(model_dir, layout, list(gguf_types), stamps, log, calib_tokens,
                        (validate_options or {}).get("gpu_layers", "auto"), tuple(tiers))
    gptqs = build_gptqs(model_dir, layout, list(gptq_bits), stamps, src_fp, calib_tokens)
    options = validate_options or {}
    data = run_validate(model_dir, layout, ggufs + gptqs, stamps, src_fp, options)
    summary = layout.base / ".stamps" / "package-result.json"   # who was packaged, for reruns that skip

    def pack():
        included, left_out = build_package(model_dir, layout, data, ggufs, gptqs, parse_size(split_max_size, "--split-max-size"),
                                           model_hash(model_dir), log)
        atomic_write_text(summary, json.dumps({"included": included, "left_out": left_out}))
    stamps.run("package", {"report": fingerprint([layout.validate_dir / "report.json"]),
                           "artifacts": fingerprint(ggufs + gptqs), "split": split_max_size},
               [layout.release_dir / package.SUMS], pack)
    saved = json.loads(summary.read_text())
    return ReleaseResult(layout.release_dir, saved["included"], saved["left_out"], stamps.ran, stamps.skipped,
                         layout.validate_dir / "report.json")
