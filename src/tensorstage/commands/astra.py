"""``tensorstage astra-config --system SYS --ranks N --out DIR [--trace TRACE]``: ASTRA-sim input files.

Why: to run our traces on ASTRA-sim (or to compare it with our simulator) one needs its network,
system and remote-memory files for the same machine, and the command line that ties them to a
trace and its communicator-group file. The numbers come from :mod:`tensorstage.trace.astra_config`
(our efficiency-adjusted bandwidths, per-link latencies as ASTRA charges them, our compute roofline).
With ``--trace`` the rank count comes from the trace's manifest and the command lines name its rank
files and communicator groups; ``generate --astra-config`` does the same into the trace folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tensorstage.errors import SpecError
from tensorstage.fileio import read_json_file
from tensorstage.report.console import print_json


def write_config(system: str, ranks: int, out: Path, dtype: str = "bf16", workload: str | None = None,
                 comm_groups: str | None = None) -> dict[str, Any]:
    """Write the ASTRA-sim files for ``system`` at ``ranks`` NPUs into ``out``; returns what was written.

    ``workload`` / ``comm_groups`` go into the command lines (placeholders when not given).
    """
    from tensorstage.hardware import load_system
    from tensorstage.trace.astra_config import astra_command, astra_config, write_astra_config

    if ranks < 1:
        raise SpecError("ranks", f"must be >= 1, got {ranks}")
    cfg = astra_config(load_system(system, ranks), dtype)
    workload = workload or "TRACE_DIR/trace"
    comm_groups = comm_groups or "TRACE_DIR/trace_comm_groups.json"
    files = write_astra_config(cfg, out, workload, comm_groups)
    return {"system": cfg.system_name, "npus": cfg.npus, "dtype": dtype,
            "files": {k: str(v) for k, v in files.items()}, "network": cfg.network,
            "commands": {"replay": astra_command(str(out), workload, comm_groups, roofline=False),
                         "roofline": astra_command(str(out), workload, comm_groups, roofline=True)}}


def write_for_trace(system: str, trace_dir: Path, manifest: dict[str, Any], dtype: str) -> dict[str, Any]:
    """The ASTRA-sim files for a trace folder just written, into that folder."""
    files = manifest["files"]
    if manifest.get("mode") != "per_rank":
        raise SpecError("astra-config", "ASTRA-sim needs one file per rank; drop --classes-only")
    return write_config(system, int(manifest["world"]), trace_dir, dtype,
                        workload=str(trace_dir / files["prefix"]), comm_groups=str(trace_dir / files["comm_groups"]))


def _trace_manifest(trace: Path) -> dict[str, Any]:
    path = trace / "manifest.json"
    if not path.is_file():
        raise SpecError("trace", f"{trace} holds no manifest.json (a folder written by `tensorstage generate`)")
    return read_json_file(path, "trace manifest")


def register(app: typer.Typer) -> None:
    """Add the ``astra-config`` command."""

    @app.command("astra-config")
    def astra_config_cmd(
        system: str = typer.Option(..., "--system", help="System preset or YAML."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for network.yml, system*.json, remote_memory.json."),
        ranks: int | None = typer.Option(None, "--ranks", help="NPUs (the trace's world size); default: --trace's."),
        trace: Path | None = typer.Option(None, "--trace", help="Trace folder from `generate` to name in the commands."),
        dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype of the roofline peak."),
        json_out: bool = typer.Option(False, "--json", help="Print what was written as JSON."),
    ) -> None:
        """Write ASTRA-sim's network, system and remote-memory files for SYSTEM, and the command lines."""
        workload = groups = None
        if trace is not None:
            manifest = _trace_manifest(trace)
            world = int(manifest["world"])
            if ranks is not None and ranks != world:
                raise SpecError("ranks", f"{ranks} differs from the trace's world size {world}")
            ranks = world
            workload = str(trace / manifest["files"]["prefix"])
            groups = str(trace / manifest["files"]["comm_groups"])
        if ranks is None:
            raise SpecError("ranks", "required (or give --trace)")
        info = write_config(system, ranks, out, dtype, workload, groups)
        if json_out:
            print_json(info)
            return
        typer.echo(f"ASTRA-sim files for {info['system']} ({info['npus']} NPUs) in {out}:")
        for role, path in info["files"].items():
            typer.echo(f"  {role}: {path}")
        typer.echo("replay mode (COMP duration_micros; `generate --system` writes them):")
        typer.echo(f"  {info['commands']['replay']}")
        typer.echo("roofline mode:")
        typer.echo(f"  {info['commands']['roofline']}")
