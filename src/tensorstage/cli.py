"""The ``tensorstage`` command: thin parsing that calls into the packages.

Each command group lives in ``tensorstage.commands.<name>`` and registers itself on the app.
User-input errors (:class:`~tensorstage.errors.SpecError`) become one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import shutil
import signal
import sys
import warnings
from typing import Any

import typer

try:  # typer >= 0.24 vendors click; older typer uses click itself
    from typer._click import exceptions as click_exc
except ImportError:  # pragma: no cover
    from click import exceptions as click_exc  # type: ignore[no-redef]

from tensorstage import __version__
from tensorstage.errors import InputWarning, SpecError
from tensorstage.interrupts import exit_on_next_interrupt_after_cancel
from tensorstage.report.console import leave_on_broken_pipe

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
    "tensorstage.commands.serve",
    "tensorstage.commands.replay",
    "tensorstage.commands.explore",
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


#: Below this terminal width ``--help`` is printed in click's plain layout, which wraps every
#: option name and choice instead of truncating the longest ones (``--fsdp-reshard-aft…``).
NARROW_HELP_COLUMNS = 110


def _usage_line(exc: Any) -> str:
    """A click usage error as one line (click prints a multi-line box): the command path, the
    option (``--tp``) and the message, e.g. ``error: tensorstage simulate: --tp: '1.5' ...``."""
    msg = " ".join(exc.format_message().split())
    param = getattr(exc, "param", None)
    opts = getattr(param, "opts", None)
    if opts and opts[0] not in msg:
        msg = f"{opts[0]}: {msg}"
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "tensorstage"
    return f"error: {where}: {msg}"


def _show_warning(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    """Our input warnings as one ``warning:`` line; others as Python shows them."""
    if issubclass(category, InputWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_showwarning(message, category, *_, **__)


_python_showwarning = warnings.showwarning


_RICH_MODE = app.rich_markup_mode


def main() -> None:
    """Console entry point: run the app, turning bad input into one line and exit code 2."""
    warnings.showwarning = _show_warning
    narrow = shutil.get_terminal_size((NARROW_HELP_COLUMNS, 24)).columns < NARROW_HELP_COLUMNS
    app.rich_markup_mode = None if narrow else _RICH_MODE  # plain click help wraps; rich's table cuts (…)
    try:
        code = app(prog_name="tensorstage", standalone_mode=False)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit-time flush
        if isinstance(code, int) and code:
            sys.exit(code)
    except click_exc.NoArgsIsHelpError as exc:  # bare `tensorstage`: the help, as before
        print(exc.ctx.get_help() if exc.ctx is not None else str(exc), file=sys.stderr)
        sys.exit(2)
    except click_exc.UsageError as exc:  # --tp 1.5, a misspelt command, a missing argument
        print(_usage_line(exc), file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C: the command has cleaned up; no traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # leaving anyway: a further Ctrl-C changes nothing
        print("cancelled", file=sys.stderr)
        sys.exit(130)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `tensorstage ... | head`: the reader stopped; leave as a SIGPIPE'd tool does
        leave_on_broken_pipe()
    except OSError as exc:  # an output path that is a folder, not writable, ...: the user's to fix
        where = f"{exc.filename}: " if exc.filename is not None else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)


def console_main() -> None:
    """The ``tensorstage`` program: :func:`main` in a process of its own, where after a cancelled
    command a further Ctrl-C exits at once (in-process callers of :func:`main`, such as the tests,
    keep Python's handler)."""
    exit_on_next_interrupt_after_cancel()
    main()


if __name__ == "__main__":
    console_main()
