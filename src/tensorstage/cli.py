"""The ``tensorstage`` command: thin parsing that calls into the packages.

Each command group lives in ``tensorstage.commands.<name>`` and registers itself on the app.
User-input errors (:class:`~tensorstage.errors.SpecError`) become one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

from tensorstage import __version__
from tensorstage.errors import SpecError

app = typer.Typer(
    name="tensorstage",
    help="Model distributed LLM training and inference: graphs, parallel plans, Chakra traces, simulation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "tensorstage.commands.models",
    "tensorstage.commands.hardware",
    "tensorstage.commands.explain",
    "tensorstage.commands.generate",
    "tensorstage.commands.astra",
    "tensorstage.commands.simulate",
    "tensorstage.commands.run",
    "tensorstage.commands.validate",
    "tensorstage.commands.replay",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tensorstage {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """tensorstage: what will this model, with this plan, on this cluster, cost?"""


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main() -> None:
    """Console entry point: run the app, turning bad input into one line and exit code 2."""
    try:
        app()
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:  # an output path that is a folder, not writable, ...: the user's to fix
        where = exc.filename if exc.filename is not None else "file"
        print(f"error: {where}: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
