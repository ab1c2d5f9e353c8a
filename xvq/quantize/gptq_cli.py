"""`xvq quantize gptq MODEL_DIR`: GPTQ through GPTQModel, XVERSE's published settings by default."""
from __future__ import annotations

from pathlib import Path

import click

from xvq.layout import Layout
from xvq.units import SIZE_HELP, parse_size

def _check_size(ctx, param, value: str) -> int:
    return parse_size(value, "--max-shard-size")


@click.command("gptq")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--outdir", type=click.Path(path_type=Path), default=None,
              help="Output folder (default: the layout's gptq/<Name>-GPTQ-Int<bits>/).")
@click.option("--name", default=None, help="Model name for the layout (default: the folder's name).")
@click.option("--out-root", type=click.Path(path_type=Path), default=None, help="Layout root (default: out).")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default="4", show_default=True)
@click.option("--group-size", type=int, default=None,
              help="Columns per scale; -1: one per row. Default: 128, or the largest of 64/32 dividing every width (MoE experts).")
@click.option("--desc-act/--no-desc-act", default=True, show_default=True,
              help="Quantize columns in order of decreasing activation (act-order).")
@click.option("--static-groups/--no-static-groups", default=True, show_default=True,
              help="Fix group scales before act-order (kernels stay fast with desc-act).")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric grid (no stored zero points).")
@click.option("--true-sequential/--no-true-sequential", default=True, show_default=True,
              help="Within a layer, quantize attention before MLP on the already-quantized outputs.")
@click.option("--damp", type=float, default=0.01, show_default=True,
              help="Hessian dampening, a fraction of its mean diagonal (raised automatically on a Cholesky failure).")
@click.option("--calib-tokens", type=int, default=131072, show_default=True, help="Calibration budget in tokens.")
@click.option("--max-seq-len", type=int, default=2048, show_default=True, help="Longest calibration sequence.")
@click.option("--seed", type=int, default=0, show_default=True, help="Calibration sampling seed.")
@click.option("--max-shard-size", default="4GB", show_default=True, callback=_check_size,
              help=f"Largest safetensors shard ({SIZE_HELP}).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--moe-min-tokens", type=int, default=None,
              help="MoE: experts routed fewer calibration tokens are calibrated on every token (default: the hidden size).")
@click.option("--keep-architecture", is_flag=True,
              help="Keep the source's config (XVERSE: XverseForCausalLM, auto_map to XVERSE's remote code) "
                   "instead of LlamaForCausalLM (dense) or xvq's shipped modeling file (MoE); then only xvq "
                   "(`import xvq`) or XVERSE's code loads it.")
@click.option("--verbose", "-v", is_flag=True, help="Show GPTQModel's and transformers' output (default: a log file "
                                                    "beside the output folder).")
def gptq_cmd(model_dir, outdir, name, out_root, bits, group_size, desc_act, static_groups, sym, true_sequential,
             damp, calib_tokens, max_seq_len, seed, max_shard_size, device, moe_min_tokens, keep_architecture,
             verbose):
    """Quantize MODEL_DIR (XVERSE dense, XVERSE-MoE, LLaMA, Ziya, ...) to GPTQ, calibrated on xvq's
    multilingual calibration set. Output: sharded safetensors + quantize_config.json (GPTQ v1).

    \b
    What loads it (tested on CPU, in a fresh Python process without xvq):
      dense XVERSE (saved as LlamaForCausalLM), LLaMA, Ziya: transformers'
        AutoModelForCausalLM with GPTQModel installed, no remote code;
      XVERSE-MoE: the same with trust_remote_code=True (the folder carries its
        modeling file for transformers 5).
    """
    from xvq.quantize.gptq import GptqSettings, quantize_gptq
    from xvq.quiet import Always, Steps, set_verbosity
    set_verbosity(verbose)
    settings = GptqSettings(bits=int(bits), group_size=group_size, desc_act=desc_act, static_groups=static_groups,
                            sym=sym, true_sequential=true_sequential, damp=damp, calib_tokens=calib_tokens,
                            max_seq_len=max_seq_len, seed=seed, max_shard_size=max_shard_size, device=device,
                            moe_min_tokens=moe_min_tokens, keep_architecture=keep_architecture)
    if outdir is None:
        outdir = Layout.for_model(model_dir, name, out_root).gptq(settings.bits)
    outdir = Path(outdir)
    results = []
    with Steps(Always(), outdir.parent, verbose, session=outdir.name) as steps:
        steps.run(outdir.name, {}, [], lambda: results.append(quantize_gptq(model_dir, outdir, settings)))
    result = results[0]
    for line in result.damp_raised:
        click.echo(f"damp raised: {line}")
    click.echo(f"wrote {result.outdir} ({result.n_sequences} calibration sequences, {result.n_tokens} tokens)")
