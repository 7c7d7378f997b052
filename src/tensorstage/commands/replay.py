"""``tensorstage replay`` and ``tensorstage calibrate-network``: measure, compare, calibrate.

* ``replay MODEL [plan flags] | --trace DIR``: every communication node of every rank of the
  plan's mesh run on one process per rank, in program order, sizes times ``--scale``, compute
  skipped or slept (:mod:`tensorstage.replay.step`); prints measured vs simulated communication
  per class and kind; ``--timeline`` writes the Perfetto trace (one track per rank, then the
  simulated timeline of the same slice).

* ``replay --bench``: the microbenchmark sweep (:func:`tensorstage.replay.bench.run_microbench`)
  on ``--ranks`` real processes (gloo), on emulated links (network namespaces + ``tc``, root) or
  loopback; prints measured vs predicted per case, the largest errors from 1 MiB up and the
  alpha-beta fit per link tier. ``--out FILE`` keeps the result for ``calibrate-network``.
* ``calibrate-network RESULT --system BASE --out FILE``: fits alpha-beta per tier from a sweep
  result and writes a system YAML that ``--system FILE`` accepts everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import typer

from tensorstage.api import PlanChoice
from tensorstage.errors import SpecError
from tensorstage.parallel.plan import ParallelPlan
from tensorstage.report.console import print_json, print_table

_SIZE = re.compile(r"^(\d+)\s*([KMG]?)(i?B)?$", re.IGNORECASE)
DEFAULT_SIZES = "64K,256K,1M,4M,16M,64M"


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"64K,1M"`` -> bytes (K/M/G are binary: KiB, MiB, GiB)."""
    out = []
    for part in text.split(","):
        m = _SIZE.match(part.strip())
        if not m:
            raise SpecError("sizes", f"not a size: {part!r} (e.g. 64K, 1M, 4MiB, 1048576)")
        out.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()])
    return tuple(out)


def parse_ops(text: str) -> tuple[str, ...]:
    from tensorstage.replay.ops import BENCH_OPS

    ops = tuple(o.strip().replace("-", "_") for o in text.split(",") if o.strip())
    bad = [o for o in ops if o not in BENCH_OPS]
    if bad or not ops:
        raise SpecError("ops", f"unknown operation {bad[0] if bad else text!r}", BENCH_OPS)
    return ops


def _print_bench(doc: dict) -> None:
    rows = [[r["op"], r["group"], r["size_bytes"], r["measured_s"] * 1e3, r["simulator_s"] * 1e3,
             round(r["simulator_error_pct"], 1), r["algorithm_s"] * 1e3, round(r["algorithm_error_pct"], 1)]
            for r in doc["comparison"]]
    print_table(f"Replay on {doc['links']['ranks']} processes ({doc['network']})",
                ["op", "group", "bytes", "measured ms", "simulator ms", "err %", "algorithm ms", "err %"], rows)
    fits = [[f"{f['tier']} {f['name']}", f["latency_s"] * 1e6, f["bandwidth_Bps"] / 1e6,
             round(f["bandwidth_vs_emulated_pct"], 1), f["cases"], round(f["rel_rms_pct"], 1)] for f in doc["fit"]]
    print_table("Alpha-beta fit per tier", ["tier", "latency us", "MB/s", "vs link %", "cases", "rel RMS %"], fits)
    for n in doc["notes"]:
        typer.echo(f"note: {n}")


def parse_slice(text: str | None) -> dict[str, int]:
    """``"dp=0,cp=0"`` -> ``{"dp": 0, "cp": 0}`` (mesh axis coordinates the replayed ranks have)."""
    out: dict[str, int] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        axis, _, value = part.partition("=")
        if not value.strip().isdigit():
            raise SpecError("slice", f"not AXIS=COORD: {part!r} (e.g. dp=0 or dp=0,cp=0)")
        out[axis.strip()] = int(value)
    return out


def _print_step(doc: dict) -> None:
    rows = []
    for pc in doc["per_class"]:
        label = ",".join(f"{k}={v}" for k, v in sorted(pc["class_key"].items())) or "all"
        for kind, v in pc["by_kind"].items():
            rows.append([label, kind, v["nodes"], v["measured_s"] * 1e3, v["simulated_s"] * 1e3,
                         v["algorithm_model_s"] * 1e3])
        rows.append([label, "total", sum(v["nodes"] for v in pc["by_kind"].values()), pc["comm_measured_s"] * 1e3,
                     pc["comm_simulated_s"] * 1e3, pc["comm_algorithm_model_s"] * 1e3])
    print_table(f"Step communication, measured vs simulated ({doc['links']['ranks']} processes, {doc['network']})",
                ["class", "kind", "nodes", "measured ms", "simulated ms", "algorithm model ms"], rows)
    typer.echo(f"replay wall time {doc['measured_wall_s'] * 1e3:.1f} ms (ops one after another per rank); "
               f"simulated step of the same slice {doc['simulated_step_s'] * 1e3:.1f} ms (streams overlapped)")
    for n in doc["notes"]:
        typer.echo(f"note: {n}")


def _step_markdown(doc: dict) -> str:
    lines = [f"# Step replay: {doc['links']['ranks']} processes on {doc['network']}", "",
             f"Inputs: `{json.dumps(doc['inputs'], sort_keys=True)}`", "",
             "| class | kind | nodes | measured ms | simulated ms | algorithm model ms |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for pc in doc["per_class"]:
        label = ",".join(f"{k}={v}" for k, v in sorted(pc["class_key"].items())) or "all"
        for kind, v in pc["by_kind"].items():
            lines.append(f"| {label} | {kind} | {v['nodes']} | {v['measured_s'] * 1e3:.2f} | {v['simulated_s'] * 1e3:.2f} | "
                         f"{v['algorithm_model_s'] * 1e3:.2f} |")
        lines.append(f"| {label} | **total** | | {pc['comm_measured_s'] * 1e3:.2f} | {pc['comm_simulated_s'] * 1e3:.2f} | "
                     f"{pc['comm_algorithm_model_s'] * 1e3:.2f} |")
    lines += ["", f"Replay wall time {doc['measured_wall_s'] * 1e3:.1f} ms; simulated step of the same slice "
              f"{doc['simulated_step_s'] * 1e3:.1f} ms.", ""] + [f"- {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def _replay_step(model: str | None, trace: Path | None, plan: object, links_for: object, kw: dict,
                 json_out: bool, timeline: Path | None, report: Path | None, flags_given: bool = False) -> None:
    from tensorstage.replay.step import replay_model, replay_trace, step_dict
    from tensorstage.replay.timeline import replay_trace_events

    if trace is not None:
        if model is not None:
            raise SpecError("model", "give a MODEL or --trace, not both")
        if flags_given:
            raise SpecError("plan", "plan flags and -c do not apply to --trace: the traces fix the plan")
        res = replay_trace(trace, links_for, **kw)
    else:
        if model is None:
            raise SpecError("model", "missing MODEL (or --trace DIR, or --bench)")
        res = replay_model(model, plan, links_for, **kw)
    doc = step_dict(res)
    events = replay_trace_events(res) if (timeline is not None or report is not None) else None
    if timeline is not None:
        from tensorstage.fileio import write_text_atomic

        write_text_atomic(timeline, json.dumps(events) + "\n")
    if report is not None:
        from tensorstage.replay.report import write_report

        write_report(report, doc, _step_markdown(doc), plot=False, extra={"timeline.json": events})
    if json_out:
        print_json(doc)
    else:
        _print_step(doc)


def register(app: typer.Typer) -> None:
    from tensorstage.commands.planopts import with_plan_options

    @app.command("replay")
    @with_plan_options
    def replay(
        model: str | None = typer.Argument(None, help="Model to lower and replay (or --trace DIR, or --bench)."),
        plan: ParallelPlan = None,  # type: ignore[assignment]  # filled in by with_plan_options
        plan_choice: PlanChoice | None = None,  # which plan flags were given (filled in likewise)
        trace: Path | None = typer.Option(None, "--trace", help="Replay the Chakra ET files in this directory."),
        bench: bool = typer.Option(False, "--bench", help="Run the collective/send-recv microbenchmark sweep."),
        ranks: int | None = typer.Option(None, "--ranks", help="Processes to start (bench: 8; replay: the "
                                         "ranks replayed, which it must equal)."),
        slice_: str | None = typer.Option(None, "--slice", help="Replay: only ranks with these mesh "
                                          "coordinates, e.g. dp=0 (one TP group per pipeline stage)."),
        scale: float = typer.Option(0.01, "--scale", help="Replay: factor on every message size (0 < F <= 1)."),
        compute: str = typer.Option("skip", "--compute", help="Replay: compute nodes skip|wait (sleep for "
                                    "their simulated duration on --system)."),
        system: str = typer.Option("dgx-h100-superpod", "--system", help="Replay: system whose device times "
                                   "compute nodes (links come from the --link flags)."),
        timeline: Path | None = typer.Option(None, "--timeline", help="Replay: write the Perfetto trace here."),
        network: str = typer.Option("auto", "--network", help="auto|netns|loopback (netns needs root)."),
        link_GBps: float = typer.Option(0.0125, "--link-GBps", help="Per-rank link rate, GB/s each direction "
                                        "(intra-node tier); emulated with tc, or assumed on loopback."),
        link_latency_us: float = typer.Option(0.0, "--link-latency-us", help="One-way link delay (netem)."),
        node_size: int | None = typer.Option(None, "--node-size", help="Ranks per emulated node (two tiers)."),
        inter_GBps: float | None = typer.Option(None, "--inter-GBps", help="Inter-node link rate, GB/s."),
        inter_latency_us: float | None = typer.Option(None, "--inter-latency-us", help="Inter-node delay."),
        sizes: str = typer.Option(DEFAULT_SIZES, "--sizes", help="Benchmark sizes (full buffer), e.g. 64K,1M."),
        ops: str = typer.Option("all_reduce,all_gather,reduce_scatter,all_to_all,send_recv", "--ops",
                                help="Operations to benchmark."),
        warmup: int = typer.Option(1, "--warmup", help="Unrecorded repetitions per case."),
        repeats: int = typer.Option(3, "--repeats", help="Recorded repetitions per case (median kept)."),
        timeout_s: float = typer.Option(600.0, "--timeout-s", help="Wall-clock limit of the whole run."),
        max_gib: float = typer.Option(16.0, "--max-gib", help="Limit on the bytes one rank may move (GiB)."),
        out: Path | None = typer.Option(None, "--out", help="Write the result JSON (for calibrate-network)."),
        report: Path | None = typer.Option(None, "--report", help="Write result.json, report.md and a plot here."),
        collectives: str = typer.Option("p2p", "--collectives", help="p2p: the simulator's algorithms (ring "
                                        "reduce-scatter/all-gather/all-reduce, direct all-to-all) on send/recv; "
                                        "native: gloo's own collectives."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Run a plan's communication (or the --bench sweep) on real processes over emulated links."""
        from tensorstage.replay.bench import bench_dict, make_links, run_microbench
        from tensorstage.replay.report import bench_markdown, write_report

        if report is not None:
            from tensorstage.fileio import require_replaceable_dir

            require_replaceable_dir(report, "report")
        if timeline is not None and timeline.is_dir():
            raise SpecError("timeline", f"{timeline} is a directory; give a file path (e.g. replay.json)")
        flags_given = plan_choice is not None and (bool(plan_choice.given) or plan_choice.base != "default")
        if not bench:
            def links_for(world: int) -> object:
                if ranks is not None and ranks != world:
                    raise SpecError("ranks", f"{world} ranks are replayed; --ranks must equal it (got {ranks})")
                return make_links(world, link_GBps, link_latency_us, node_size, inter_GBps, inter_latency_us)

            kw = {"system": system, "scale": scale, "compute": compute, "network": network, "timeout_s": timeout_s,
                  "max_bytes": int(max_gib * 2**30), "fixed": parse_slice(slice_), "collectives": collectives,
                  "inputs": {"scale": scale, "compute": compute, "slice": slice_ or "all", "collectives": collectives}}
            _replay_step(model, trace, plan, links_for, kw, json_out, timeline, report, flags_given)
            return
        if model is not None or trace is not None or slice_ or flags_given:
            raise SpecError("bench", "--bench takes no MODEL, --trace, --slice or plan flags")
        links = make_links(ranks or 8, link_GBps, link_latency_us, node_size, inter_GBps, inter_latency_us)
        res = run_microbench(links, network=network, ops=parse_ops(ops), sizes_bytes=parse_sizes(sizes),
                             warmup=warmup, repeats=repeats, timeout_s=timeout_s, max_bytes=int(max_gib * 2**30),
                             collectives=collectives)
        doc = bench_dict(res)
        if out is not None:
            from tensorstage.fileio import write_text_atomic

            write_text_atomic(out, json.dumps(doc, indent=1, sort_keys=True) + "\n")
        if report is not None:
            write_report(report, doc, bench_markdown(doc))
        if json_out:
            print_json(doc)
        else:
            _print_bench(doc)

    @app.command("calibrate-network")
    def calibrate_network(
        results: Path = typer.Argument(..., help="Result JSON of `replay --bench --out`."),
        system: str = typer.Option(..., "--system", help="Base system preset or YAML (devices, dimensions)."),
        out: Path = typer.Option(..., "--out", help="System YAML to write."),
        min_kib: int = typer.Option(0, "--min-kib", help="Fit only cases of at least this size (KiB)."),
        fit_ops: str = typer.Option("all_reduce,all_gather,reduce_scatter,send_recv", "--fit-ops",
                                    help="Operations the fit uses (all_to_all: many flows per port, left out)."),
        json_out: bool = typer.Option(False, "--json", help="Print the fit as JSON."),
    ) -> None:
        """Fit alpha-beta per link tier from replay results and write a calibrated system file."""
        from tensorstage.fileio import read_text_file
        from tensorstage.hardware.system import write_system_yaml
        from tensorstage.replay.bench import bench_from_dict
        from tensorstage.replay.calibrate import calibrated_system, load_base_system
        from tensorstage.replay.fit import compare, fit_tiers

        try:
            data = json.loads(read_text_file(results))
        except ValueError as exc:
            raise SpecError("results", f"{results}: not JSON ({exc})") from None
        links, samples, network, impl = bench_from_dict(data)
        base = load_base_system(system)
        fits = fit_tiers(compare(samples, links, impl), links, min_kib * 1024, parse_ops(fit_ops), impl)
        spec = calibrated_system(base, fits, results.name, network)
        write_system_yaml(spec, out)
        doc = {"system": spec.name, "out": str(out),
               "fit": [{"tier": f.tier, "name": f.name, "latency_s": f.latency_s, "bandwidth_Bps": f.bandwidth_Bps,
                        "cases": f.cases, "rel_rms_pct": f.rel_rms_pct} for f in fits]}
        if json_out:
            print_json(doc)
        else:
            print_table(f"Calibrated {spec.name}", ["tier", "latency us", "MB/s", "cases", "rel RMS %"],
                        [[f"{f.tier} {f.name}", f.latency_s * 1e6, f.bandwidth_Bps / 1e6, f.cases,
                          round(f.rel_rms_pct, 1)] for f in fits])
            typer.echo(f"system: {out}")
