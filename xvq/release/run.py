"""`xvq run`: try an artifact right away through llama.cpp."""
from __future__ import annotations

from pathlib import Path

import click


def load(path: Path, ctx: int, verbose: bool = False):
    from llama_cpp import Llama
    from xvq.errors import XvqError
    try:
        return Llama(str(path), n_ctx=ctx, verbose=verbose)
    except Exception as e:
        raise XvqError(f"{path}: llama.cpp could not load it ({e}); check the file with `xvq release verify`") from e


@click.command("run")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", default="Once upon a time", show_default=True)
@click.option("-n", "--n-predict", default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Format the prompt with the file's chat template.")
@click.option("--temp", default=0.0, show_default=True, help="0 = greedy.")
@click.option("--ctx", default=0, show_default=True, type=click.IntRange(min=0),
              help="Context length; 0 = the model's own.")
def run_cmd(gguf_file: Path, prompt: str, n_predict: int, chat: bool, temp: float, ctx: int):
    """Generate from a GGUF with llama.cpp (greedy by default)."""
    llm = load(gguf_file, ctx)
    if chat:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}],
                                         max_tokens=n_predict, temperature=temp, stream=True)
        for chunk in out:
            click.echo(chunk["choices"][0]["delta"].get("content", ""), nl=False)
    else:
        click.echo(prompt, nl=False)
        for chunk in llm.create_completion(prompt, max_tokens=n_predict, temperature=temp, stream=True):
            click.echo(chunk["choices"][0]["text"], nl=False)
    click.echo()
