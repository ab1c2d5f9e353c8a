"""`xvq run`: try an artifact right away through llama.cpp."""
from __future__ import annotations

from pathlib import Path

import click

from xvq.llamacpp.runtime import GPU_LAYERS_HELP


@click.command("run")
@click.argument("gguf_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-p", "--prompt", default="Once upon a time", show_default=True)
@click.option("-n", "--n-predict", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--chat", is_flag=True, help="Format the prompt with the file's chat template.")
@click.option("--temp", type=click.FloatRange(min=0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--ctx", type=click.IntRange(min=0), default=0, show_default=True,
              help="Context length; 0 = the model's own.")
@click.option("--gpu-layers", default="auto", show_default=True, help=GPU_LAYERS_HELP)
def run_cmd(gguf_file: Path, prompt: str, n_predict: int, chat: bool, temp: float, ctx: int, gpu_layers: str):
    """Generate from a GGUF with llama.cpp (greedy by default)."""
    from xvq.llamacpp import chat_model
    llm = chat_model(gguf_file, ctx, gpu_layers=gpu_layers,
                     hint="convert it again, or check a release folder with `xvq release verify FOLDER`")
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
    llm.close()
