from pathlib import Path

import click


@click.command("convert")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--outfile", type=click.Path(path_type=Path), help="Output .gguf (default: the layout's gguf/ name).")
@click.option("--outtype", type=click.Choice(["f32", "f16", "bf16", "q8_0"], case_sensitive=False), default="f16",
              show_default=True)
@click.option("--split-max-size", default=None, help="Split into llama.cpp shards of at most this size, e.g. 4G.")
@click.option("--name", default=None, help="Model name (default: the model folder's name).")
@click.option("--chat-template", default=None, help="Template name (xverse) or a Jinja file.")
@click.option("--rope-theta", type=float, default=None, help="Override the config's RoPE theta.")
@click.option("--out-root", type=click.Path(path_type=Path), default=None, help="Layout root (default: out).")
@click.option("--allow-nonfinite", is_flag=True, help="Convert weights holding NaN/Inf with a warning instead of refusing.")
def convert_cmd(model_dir, outfile, outtype, split_max_size, name, chat_template, rope_theta, out_root,
                allow_nonfinite):
    """Convert a Hugging Face checkpoint (XVERSE, LLaMA) to GGUF, streaming."""
    from xvq.convert import compare_tokenization, convert, layout_f16, parity_sample
    from xvq.layout import Layout
    layout = Layout.for_model(model_dir, name, out_root)
    plain_f16 = outfile is None and outtype.lower() == "f16" and not (split_max_size or chat_template or rope_theta
                                                                      or allow_nonfinite)
    if plain_f16:   # the layout's f16, as `xvq quantize gguf MODEL_DIR` and `xvq release` make it (one stamp)
        written = [layout_f16(model_dir, layout, force=True)]
    else:
        written = convert(model_dir, outfile or layout.gguf(outtype), outtype, split_max_size=split_max_size,
                          name=name, chat_template=chat_template, rope_theta=rope_theta,
                          allow_nonfinite=allow_nonfinite)
    for p in written:
        click.echo(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")
    parity = compare_tokenization(written[0], model_dir, parity_sample())
    click.echo(f"tokenizer: {tokenizer_summary(written[0])}")
    click.echo(f"tokenizer parity with Hugging Face on the built-in multilingual sample: {parity.summary()}")


def tokenizer_summary(gguf_path: Path) -> str:
    """Which llama.cpp tokenizer the file asks for: for byte-level BPE, the pre-tokenizer xvq chose."""
    from xvq.llamacpp import read_header
    kv = read_header(gguf_path).kv
    if kv.get("tokenizer.ggml.model") == "gpt2":
        return (f"byte-level BPE (tokenizer.ggml.model gpt2), llama.cpp pre-tokenizer "
                f"'{kv.get('tokenizer.ggml.pre')}', chosen from the tokenizer's declared regex")
    return "SentencePiece-style BPE (tokenizer.ggml.model llama)"
