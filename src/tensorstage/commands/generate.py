"""``tensorstage generate MODEL [plan flags | -c plan.yaml] --out DIR``: Chakra ET traces of one step.

Why: the traces are what ASTRA-sim (and our own simulator) run. The command lowers the model under
the plan (:func:`tensorstage.lower.lower`: one Program per pipeline stage), then writes one
``<prefix>.<rank>.et`` per rank, the communicator groups and ``manifest.json``
(:func:`tensorstage.trace.write_chakra`), and prints per-class totals. The manifest's ``inputs``
record the model, the plan summary, dtype and tokens per step, so ``simulate --trace DIR`` can
rerun it without flags. A bad model or plan is one line on stderr and exit code 2, before anything
is written (the writer is atomic, so a failure never leaves a partial directory).

``--system SYS`` also writes every COMP node's ``duration_micros`` from our compute model on that
system (:mod:`tensorstage.sim.durations`), so ASTRA-sim's replay mode runs our compute times;
without it the manifest says durations are absent. ``--astra-config`` (needs ``--system``) writes
ASTRA-sim's network, system and memory files and the command lines into the same folder
(:mod:`tensorstage.commands.astra`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import typer

from tensorstage import api
from tensorstage.errors import SpecError
from tensorstage.interrupts import cancel_on_interrupt
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.report.console import print_json, print_table


def _summary_rows(manifest: dict[str, Any]) -> list[list[Any]]:
    rows = []
    for cid, c in manifest["classes"].items():
        coll = sum(b for per_axes in c["collective_bytes"].values() for b in per_axes.values())
        key = ",".join(f"{k}={v}" for k, v in c["key"].items())
        rows.append([int(cid), key, c["nodes"], c["flops"] / 1e12, c["model_flops"] / 1e12, coll / 1e9,
                     c["send_bytes"] / 1e9, c["recv_bytes"] / 1e9, sum(c["static_bytes"].values()) / 2**30])
    return rows


def register(app: typer.Typer) -> None:
    """Add the ``generate`` command."""
    from tensorstage.commands.planopts import with_plan_options

    @app.command("generate")
    @with_plan_options
    def generate(
        model: str = typer.Argument(..., help="Preset name, HF config.json or model YAML."),
        plan: ParallelPlan | None = None,
        plan_choice: api.PlanChoice | None = None,
        out: Path = typer.Option(..., "--out", "-o", help="Output directory (replaced atomically)."),
        prefix: str = typer.Option("trace", "--prefix", help="File-name prefix: <prefix>.<rank>.et."),
        workers: int = typer.Option(
            0, "--workers", min=0, help="Writer processes; 0 = one per CPU (output is identical for any count)."),
        classes_only: bool = typer.Option(
            False, "--classes-only", help="Write one file per rank class plus the rank -> class map."),
        json_traces: bool = typer.Option(
            True, "--json-traces/--no-json-traces",
            help="Also write each rank class as JSON (op kinds and memory, which Chakra has no field for; "
                 "`simulate --trace` uses them)."),
        json_out: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
        progress: bool | None = typer.Option(
            None, "--progress/--no-progress", help="Progress bar (default: when stderr is a terminal)."),
        system: str | None = typer.Option(
            None, "--system", help="Also simulate the step on this system (preset or YAML): prints the peak "
                                   "memory, records the system for `simulate --trace` and writes each COMP "
                                   "node's duration_micros from our compute model (ASTRA-sim replay mode)."),
        astra: bool = typer.Option(
            False, "--astra-config", help="Also write ASTRA-sim's network.yml, system.json, remote-memory "
                                          "JSON and command lines into OUT (needs --system)."),
        force: bool = typer.Option(
            False, "--force", help="Write even when the estimated output exceeds the free disk space."),
        world: int | None = typer.Option(
            None, "--world", help="Expected world size (e.g. the cluster's GPUs); must equal tp*cp*dp*pp."),
    ) -> None:
        """Write Chakra ET traces (one file per rank) of one step of MODEL under the parallel plan."""
        assert plan is not None  # filled by with_plan_options
        if world is not None:
            plan.check(world)
        workers = workers or os.cpu_count() or 1
        if progress is None:
            progress = sys.stderr.isatty()
        if astra and system is None:
            raise SpecError("astra-config", "needs --system (the machine ASTRA-sim should model)")
        if astra and classes_only:
            raise SpecError("astra-config", "ASTRA-sim needs one file per rank; drop --classes-only")

        def estimate(files: int, size: int, free: int) -> None:  # stderr: stdout stays the result
            print(f"estimate: {files:,} files, about {size / 1e6:,.1f} MB ({free / 1e9:,.1f} GB free)",
                  file=sys.stderr)

        with cancel_on_interrupt():  # Ctrl-C: one line, the partial output removed, no traceback
            done = api.generate(model, plan, out, prefix=prefix, workers=workers, classes_only=classes_only,
                                json_traces=json_traces, progress=progress, force=force, on_estimate=estimate,
                                system=system)
        manifest = done.manifest
        if astra:
            from tensorstage.commands.astra import write_for_trace

            write_for_trace(str(system), out, manifest, plan.dtype)
        if json_out:
            extra: dict[str, Any] = {"plan_notes": list(plan_choice.notes) if plan_choice else []}
            if done.sim is not None:
                extra.update(system=system, peak_memory_bytes=done.peak_memory_bytes,
                             hbm_capacity_bytes=done.sim.result.hbm_capacity_bytes)
            print_json({**manifest, **extra})
            return
        files = manifest["files"]
        typer.echo(api.describe_plan(plan))
        if done.sim is not None:
            res = done.sim.result
            typer.echo(f"peak memory {res.peak_memory_bytes / 2**30:.2f} / {res.hbm_capacity_bytes / 2**30:.2f} GiB "
                       f"on {system} (simulated step)" + (" (OOM)" if res.oom else ""))
        title = (f"{model}: {manifest['world']:,} ranks, {len(manifest['classes'])} classes, "
                 f"{files['count']:,} files ({files['bytes'] / 1e6:,.1f} MB) in {out}")
        print_table(title, ["class", "key", "nodes", "TFLOP", "model TFLOP", "coll GB", "send GB", "recv GB",
                            "static GiB"], _summary_rows(manifest))
