"""The `xvq` command. Each stage owns its commands in `xvq/<stage>/cli.py`; they are imported
only when used, so `xvq --help` stays fast."""
from __future__ import annotations

import importlib

import click

# command name -> "module:attribute"
COMMANDS = {
    "convert": "xvq.convert.cli:convert_cmd",
    "quantize": "xvq.quantize.cli:quantize_group",
    "calib": "xvq.calib_data.cli:calib_group",
    "validate": "xvq.validate.cli:validate_cmd",
    "delta": "xvq.delta:delta_group",
    "release": "xvq.release.cli:release_cmd",
    "fit": "xvq.release.fit:fit_cmd",
    "run": "xvq.release.run:run_cmd",
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
                raise click.ClickException(f"`xvq {name}` is not available in this build: {reason}")
            return unavailable


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="xvq")
def main():
    """Convert, quantize, validate and release XVERSE and LLaMA-family models."""


if __name__ == "__main__":
    main()
