from pathlib import Path

import click

from xvq.llamacpp.runtime import GPU_LAYERS_HELP


@click.command("validate")
@click.option("--reference", "reference", required=True, type=click.Path(path_type=Path),
              help="The bf16 Hugging Face checkpoint the artifacts were made from.")
@click.argument("artifacts", nargs=-1, type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), default=None, help="Evaluation text (UTF-8 file).")
@click.option("--heldout", is_flag=True, help="Use the held-out split of the calibration set (the default).")
@click.option("--ctx", type=int, default=512, show_default=True, help="Window length; the second half is scored.")
@click.option("--max-tokens", type=int, default=None, help="Use at most N tokens of each text (language).")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Report folder (default: the layout's validate/).")
@click.option("--max-kld", type=float, default=None, help="Override every artifact's mean-KLD limit.")
@click.option("--max-ppl-ratio", type=float, default=None, help="Override every artifact's perplexity-ratio limit.")
@click.option("--max-token-mismatch", type=float, default=None, help="Override the tokenizer mismatch-rate limit.")
@click.option("--reference-gguf", type=click.Path(path_type=Path), default=None,
              help="Score the reference from this bf16/f32 GGUF in llama.cpp (cheaper for big models).")
@click.option("--top-k", type=int, default=None, help="Reference logits kept per position (default 128).")
@click.option("--threads", type=int, default=None, help="llama.cpp threads (default: all usable cores).")
@click.option("--gpu-layers", default="auto", show_default=True, help=GPU_LAYERS_HELP)
@click.option("--layout", is_flag=True, help="Score every GGUF and GPTQ folder the output layout holds.")
@click.option("--name", default=None, help="Model name in the layout (default: the reference folder's name).")
@click.option("--out-root", type=click.Path(path_type=Path), default=None, help="Layout root (default: out).")
def validate_cmd(reference, artifacts, text, heldout, ctx, max_tokens, report_dir, max_kld, max_ppl_ratio,
                 max_token_mismatch, reference_gguf, top_k, threads, gpu_layers, layout, name, out_root):
    """Perplexity, KL divergence and top-1 agreement of each artifact against the reference;
    exits non-zero when any artifact fails its gate."""
    from xvq.errors import XvqError
    from xvq.layout import Layout
    from xvq.validate import validate
    from xvq.validate.metrics import DEFAULT_TOP_K
    lay = Layout.for_model(reference, name, out_root)
    artifacts = list(artifacts)
    if layout:
        artifacts += [*lay.ggufs(), *lay.gptqs()]
    if not artifacts:
        where = f" (the layout {lay.base} holds none)" if layout else ""
        raise XvqError(f"nothing to validate{where}: name GGUF files / GPTQ folders, or --layout after building them")
    missing = [a for a in artifacts if not Path(a).exists()]
    if missing:   # before the reference pass, which takes minutes on a big model
        raise XvqError(f"{missing[0]}: no such artifact; give an existing GGUF file or GPTQ folder "
                       f"(or --layout for every one the layout holds)")
    if text is not None and heldout:
        raise XvqError("--text and --heldout exclude each other; give one")
    report = validate(reference, artifacts, text=text, heldout=text is None, ctx=ctx, max_tokens=max_tokens,
                      report_dir=report_dir or lay.validate_dir,
                      thresholds={"max_kld": max_kld, "max_ppl_ratio": max_ppl_ratio,
                                  "max_token_mismatch": max_token_mismatch},
                      reference_gguf=reference_gguf, top_k=top_k or DEFAULT_TOP_K, n_threads=threads,
                      gpu_layers=gpu_layers, layout=lay)
    click.echo((report.report_dir / "report.md").read_text(encoding="utf-8"))
    click.echo(f"report: {report.report_dir / 'report.json'}")
    if not report.passed:
        for path, reasons in report.failures():
            click.echo(f"FAIL {path}: {'; '.join(reasons)}", err=True)
        raise SystemExit(1)
