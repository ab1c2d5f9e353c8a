"""The `xvq` command. Each stage owns its commands in `xvq/<stage>/cli.py`; they are imported
only when used, so `xvq --help` stays fast."""
from __future__ import annotations

import importlib
import os
import signal
import traceback
from pathlib import Path

import click

from xvq import interrupt
from xvq.errors import XvqError, first_words
from xvq.fsio import disk_full, disk_full_error, remove_live_partials
from xvq.heap import bound_kernel_caches

# command name -> "module:attribute"
COMMANDS = {
    "convert": "xvq.convert.cli:convert_cmd",
    "quantize": "xvq.quantize.cli:quantize_group",
    "calib": "xvq.calib_data.cli:calib_group",
    "validate": "xvq.validate.cli:validate_cmd",
    "delta": "xvq.delta_cli:delta_group",
    "release": "xvq.pipeline.cli:release_cmd",
    "fit": "xvq.fit:fit_cmd",
    "run": "xvq.run:run_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            reason = str(e)   # `e` itself is unbound once the except block ends

            @click.command(name, help=f"(unavailable: {reason})")
            def unavailable():
                raise XvqError(f"`xvq {name}` is not available in this build: {reason}")
            return unavailable


def debugging(ctx: click.Context | None = None) -> bool:
    return os.environ.get("XVQ_DEBUG", "") not in ("", "0") or bool(ctx and ctx.params.get("debug"))


def as_one_line(e: Exception) -> XvqError:
    """What a user sees for an exception no stage turned into an XvqError."""
    if isinstance(e, OSError) and e.filename and disk_full(e, Path(e.filename).parent):
        return disk_full_error(Path(e.filename))
    if isinstance(e, OSError) and e.filename:
        return XvqError(f"{e.filename}: {e.strerror or e}; check the path and its permissions")
    return XvqError(f"internal error ({type(e).__name__}: {first_words(e, 200)}); "
                    f"rerun with --debug (or XVQ_DEBUG=1) for the traceback and report it")


class XvqGroup(LazyGroup):
    """One error path: XvqError (and click's usage errors) print one line; anything else becomes
    one line too, with the traceback only under --debug / XVQ_DEBUG=1."""

    def parse_args(self, ctx, args):
        # `xvq convert … --debug` as well as `xvq --debug convert …`
        if "--debug" in args[1:]:
            args = ["--debug", *(a for a in args if a != "--debug")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        # Ctrl-C, `timeout`, `docker stop` and service managers: one policy (xvq/interrupt.py)
        previous = interrupt.install()
        try:
            return super().invoke(ctx)
        except XvqError:
            if debugging(ctx):
                traceback.print_exc()
            raise
        except KeyboardInterrupt:
            name = signal.Signals(interrupt.exit_code() - 128).name
            click.echo(f"xvq: stopped by {name}; partial files removed, nothing stamped; "
                       f"run the same command again to redo the interrupted step", err=True)
            raise click.exceptions.Exit(interrupt.exit_code()) from None
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as e:
            if debugging(ctx):
                raise
            raise as_one_line(e) from e
        finally:
            interrupt.restore(previous)


@click.group(cls=XvqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xvq")
@click.option("--debug", is_flag=True, help="Show the full traceback of an unexpected error (or set XVQ_DEBUG=1).")
def main(debug: bool):
    """Convert, quantize, validate and release XVERSE and LLaMA-family models."""
    bound_kernel_caches()   # before any command's first matmul (xvq/heap.py)


def entry() -> None:
    """The `xvq` program: an interrupted run ends at once with 128 + the signal, whatever
    threads (llama.cpp's quantizer, GPTQModel's workers) are still running."""
    try:
        main()
    except SystemExit:
        if interrupt.requested():
            interrupt.exit_now(remove_live_partials)
        raise


if __name__ == "__main__":
    entry()
