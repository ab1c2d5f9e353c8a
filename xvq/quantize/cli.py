"""`xvq quantize gguf` (and `xvq quantize gptq`, registered from gptq_cli when present)."""
from __future__ import annotations

import importlib
from pathlib import Path

import click

from xvq.llamacpp.runtime import GPU_LAYERS_HELP


@click.group("quantize", context_settings={"help_option_names": ["-h", "--help"]})
def quantize_group():
    """Quantize a model: llama.cpp GGUF types with an importance matrix, or GPTQ."""


@quantize_group.command("gguf")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--type", "types", multiple=True, default=("Q4_K_M",), show_default=True,
              help="Quantization type (repeatable), any llama-quantize offers: Q8_0, Q6_K, Q5_K_M, Q4_K_M, "
                   "Q4_0, Q3_K_M, Q2_K, IQ4_XS, IQ3_M, IQ2_M, ... (case-insensitive).")
@click.option("--imatrix", "imatrix", default="auto", show_default=True,
              help="auto (measure on the calibration set, for types below Q6_K; reuses the layout's), "
                   "none, or an imatrix FILE (GGUF or legacy .dat).")
@click.option("--outdir", type=click.Path(path_type=Path), default=None, help="Folder for the outputs.")
@click.option("--outfile", type=click.Path(path_type=Path), default=None, help="Output file (one --type only).")
@click.option("--output-tensor-type", default=None, help="ggml type for output.weight, e.g. q8_0.")
@click.option("--token-embedding-type", default=None, help="ggml type for token_embd.weight, e.g. q8_0.")
@click.option("--name", default=None, help="Model name for the layout (default: folder name or general.name).")
@click.option("--out-root", type=click.Path(path_type=Path), default=None, help="Layout root (default: out).")
@click.option("--calib-file", type=click.Path(path_type=Path), default=None,
              help="Measure the imatrix on this text instead of xvq's calibration set.")
@click.option("--calib-tokens", type=int, default=None, help="Calibration budget in tokens (default 131072).")
@click.option("--ctx", "n_ctx", type=int, default=None,
              help="imatrix chunk size in tokens (default 512); with --fit, the context to plan for (default 8192).")
@click.option("--target-size", default=None,
              help="One mixed GGUF no larger than SIZE (e.g. 17.5G), types chosen per tensor by measured "
                   "sensitivity.")
@click.option("--target-bpw", type=float, default=None, help="Like --target-size, in bits per weight (e.g. 4.5).")
@click.option("--fit", "fit_ram", default=None, help="Like --target-size: the largest mix `xvq fit` says fits RAM "
                                                   "(e.g. 16G) at --ctx.")
@click.option("--threads", type=int, default=0, help="Threads (default: all cores).")
@click.option("--gpu-layers", default="auto", show_default=True, help=GPU_LAYERS_HELP)
def gguf_cmd(source, types, imatrix, outdir, outfile, output_tensor_type, token_embedding_type, name, out_root,
             calib_file, calib_tokens, n_ctx, target_size, target_bpw, fit_ram, threads, gpu_layers):
    """Quantize SOURCE (a GGUF, or a model folder: converted to the layout's f16 GGUF first)
    with llama.cpp's quantizer; several --type reuse one importance matrix."""
    from xvq.quantize.gguf import DEFAULT_CALIB_TOKENS, ImatrixSettings, QuantizeSettings, quantize
    from xvq.quantize.mix import parse_target, quantize_mix
    if outdir is not None and outfile is not None:
        raise click.UsageError("give --outdir or --outfile, not both")
    target = parse_target(target_size, target_bpw, fit_ram, n_ctx)
    if target is not None:
        quantize_mix(source, target, imatrix=imatrix, outdir=outdir, outfile=outfile, name=name, out_root=out_root,
                     calib_file=calib_file, calib_tokens=calib_tokens, n_threads=threads, gpu_layers=gpu_layers,
                     log=click.echo)
        return
    imatrix_settings = ImatrixSettings(spec=imatrix, calib_file=calib_file,
                                       calib_tokens=calib_tokens or DEFAULT_CALIB_TOKENS, n_ctx=n_ctx or 512,
                                       n_threads=threads, gpu_layers=gpu_layers)
    quantize(source, list(types), imatrix=imatrix_settings,
             quant=QuantizeSettings(output_tensor_type, token_embedding_type, threads),
             outdir=outdir, outfile=outfile, name=name, out_root=out_root, log=click.echo)


@quantize_group.command("imatrix")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="imatrix file (default: the layout's imatrix/<name>.imatrix.gguf).")
@click.option("--name", default=None, help="Model name for the layout.")
@click.option("--out-root", type=click.Path(path_type=Path), default=None, help="Layout root (default: out).")
@click.option("--calib-file", type=click.Path(path_type=Path), default=None, help="Text to measure on.")
@click.option("--calib-tokens", type=int, default=None, help="Calibration budget in tokens (default 131072).")
@click.option("--ctx", "n_ctx", type=int, default=512, show_default=True, help="Chunk size in tokens.")
@click.option("--threads", type=int, default=0, help="Threads (default: all cores).")
@click.option("--gpu-layers", default="auto", show_default=True, help=GPU_LAYERS_HELP)
def imatrix_cmd(source, output, name, out_root, calib_file, calib_tokens, n_ctx, threads, gpu_layers):
    """Measure an importance matrix for SOURCE (GGUF or model folder) in llama.cpp's GGUF imatrix
    format, to reuse with `xvq quantize gguf --imatrix FILE` or llama-quantize --imatrix."""
    from xvq.convert import source_gguf
    from xvq.quantize.gguf import DEFAULT_CALIB_TOKENS, layout_for, measure_imatrix
    layout = layout_for(source, name, out_root, beside=output.parent if output else None)
    src = source_gguf(source, layout)
    measure_imatrix(src, output or layout.imatrix(), calib_file=calib_file,
                    calib_tokens=calib_tokens or DEFAULT_CALIB_TOKENS, tokenizer_dir=source if source.is_dir() else None,
                    n_ctx=n_ctx, n_threads=threads, gpu_layers=gpu_layers, log=click.echo)


def _register_optional(module: str, attr: str) -> None:
    """Subcommands owned by other modules (gptq) join the group when they import."""
    try:
        quantize_group.add_command(getattr(importlib.import_module(module), attr))
    except (ImportError, AttributeError):
        pass


_register_optional("xvq.quantize.gptq_cli", "gptq_cmd")
