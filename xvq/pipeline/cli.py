from __future__ import annotations

from pathlib import Path

import click

from xvq.llamacpp.runtime import GPU_LAYERS_HELP


class BuildUnlessSubcommand(click.Group):
    """`xvq release MODEL_DIR` builds; `xvq release verify DIR` checks a package."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["build", *args]
        return super().parse_args(ctx, args)


@click.group("release", cls=BuildUnlessSubcommand)
def release_cmd():
    """Build, validate and package every artifact of a model (or `verify` a package)."""


@release_cmd.command("build")
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Model name (default: the folder's name).")
@click.option("--out-root", "--outdir", "out_root", type=click.Path(path_type=Path), default=None,
              help="Layout root (default: out).")
@click.option("--gguf-type", "gguf_types", multiple=True, help="GGUF types (default: XVERSE's released set).")
@click.option("--gptq-bits", "gptq_bits", multiple=True, type=int, help="GPTQ bits (default: 4 and 8); 0 = none.")
@click.option("--split-max-size", default="48G", show_default=True, help="Split GGUFs larger than this.")
@click.option("--max-tokens", type=int, default=None, help="Cap the validation text (tokens).")
@click.option("--calib-tokens", type=int, default=None, help="Calibration budget for imatrix and GPTQ.")
@click.option("--tiers", default="", help="Also one mixed GGUF per laptop RAM tier, e.g. 8G,16G,32G,64G "
                                           "(xvq fit's 8,192 context; see docs/mix.md).")
@click.option("--force", is_flag=True, help="Redo every step.")
@click.option("--gpu-layers", default="auto", show_default=True, help=GPU_LAYERS_HELP)
@click.option("--allow-partial", is_flag=True, help="Exit 0 even when the gate left artifacts out.")
@click.option("--verbose", "-v", is_flag=True,
              help="Show every library's output (GPTQModel, transformers, torch, llama.cpp) instead of one "
                   "progress bar per step (quiet runs keep it in out/<name>/logs/).")
def build_cmd(model_dir, name, out_root, gguf_types, gptq_bits, split_max_size, max_tokens, calib_tokens, tiers,
              force, gpu_layers, allow_partial, verbose):
    """Build → validate → package MODEL_DIR into out/<name>/release/."""
    from xvq.errors import XvqError
    from xvq.pipeline import DEFAULT_GGUF_TYPES, DEFAULT_GPTQ_BITS, release
    from xvq.release import summary_lines
    from xvq.validate import load_report
    bits = [b for b in (gptq_bits or DEFAULT_GPTQ_BITS) if b]
    options = ({"max_tokens": max_tokens} if max_tokens else {}) | {"gpu_layers": gpu_layers}
    r = release(model_dir, name=name, out_root=out_root, gguf_types=gguf_types or DEFAULT_GGUF_TYPES,
                gptq_bits=bits, force=force, split_max_size=split_max_size, validate_options=options,
                calib_tokens=calib_tokens, tiers=tuple(t.strip().upper() for t in tiers.split(",") if t.strip()),
                log=click.echo, verbose=verbose)
    click.echo(f"steps run: {', '.join(r.ran) or 'none'}; up to date: {', '.join(r.skipped) or 'none'}")
    for item in r.left_out:
        click.echo(f"LEFT OUT {Path(item['path']).name}: {'; '.join(item['reasons'])}")
    click.echo("")
    for line in summary_lines(load_report(r.report), r.package, r.report.with_suffix(".md"), r.logs):
        click.echo(line)
    if r.left_out and not allow_partial:
        raise XvqError(f"{len(r.left_out)} artifact(s) failed the validation gate and were left out of "
                       f"{r.package}; see the summary above, or pass --allow-partial")


@release_cmd.command("verify")
@click.argument("package_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--no-load", is_flag=True, help="Only check the sums.")
def verify_cmd(package_dir, no_load):
    """Check SHA256SUMS and that every GGUF loads in llama.cpp."""
    from xvq.errors import XvqError
    from xvq.release import verify
    problems = verify(package_dir, load=not no_load)
    for p in problems:
        click.echo(f"FAIL {p}")
    if problems:
        raise XvqError(f"{package_dir}: {len(problems)} problem(s); rebuild with `xvq release --force`")
    click.echo(f"{package_dir}: all sums match" + ("" if no_load else ", every GGUF loads"))
