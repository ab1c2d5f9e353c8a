"""`xvq delta apply|make`: the commands over xvq.delta's tensor-by-tensor merge."""
from __future__ import annotations

from pathlib import Path

import click

from xvq.delta import DEFAULT_SHARD_SIZE, apply_delta, check_merge, make_delta
from xvq.errors import XvqError


@click.group("delta")
def delta_group():
    """Delta weights (e.g. Ziya-LLaMA): merge onto the base model, make, verify."""


@delta_group.command("apply")
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The original LLaMA folder (HF format).")
@click.option("--delta", "delta_dir", required=True, type=click.Path(path_type=Path), help="The released delta folder.")
@click.option("--outdir", type=click.Path(path_type=Path), help="Where to write the merged model.")
@click.option("--check", "check_dir", type=click.Path(path_type=Path),
              help="Instead of writing, verify this merged folder against base + delta.")
@click.option("--shard-size", default=DEFAULT_SHARD_SIZE, show_default=True, help="Largest safetensors shard.")
def apply_cmd(base, delta_dir, outdir, check_dir, shard_size):
    """target = base + delta, tensor by tensor, in the delta's dtype (the published procedure)."""
    if (outdir is None) == (check_dir is None):
        raise XvqError("xvq delta apply: give exactly one of --outdir DIR (merge) or --check DIR (verify)")
    if check_dir is not None:
        bad = check_merge(base, delta_dir, check_dir)
        for m in bad[:20]:
            click.echo(f"{m.name}: {m.reason}", err=True)
        if bad:
            raise XvqError(f"{check_dir}: {len(bad)} tensors/files differ from base + delta (first: {bad[0].name}); "
                           f"merge again with `xvq delta apply`")
        click.echo(f"{check_dir}: verified, equal to base + delta bit for bit")
        return
    out = apply_delta(base, delta_dir, outdir, shard_size=shard_size)
    click.echo(f"wrote {out}")


@delta_group.command("make")
@click.option("--base", required=True, type=click.Path(path_type=Path), help="The original model folder.")
@click.option("--target", required=True, type=click.Path(path_type=Path), help="The fine-tuned model folder.")
@click.option("--outdir", required=True, type=click.Path(path_type=Path), help="Where to write the delta.")
@click.option("--shard-size", default=DEFAULT_SHARD_SIZE, show_default=True, help="Largest safetensors shard.")
def make_cmd(base, target, outdir, shard_size):
    """delta = target - base in the target's dtype; extended vocabulary tensors whole."""
    out = make_delta(base, target, outdir, shard_size=shard_size)
    click.echo(f"wrote {out}")
