"""``tensorstage replay --bench`` and ``tensorstage calibrate-network``: measure, compare, calibrate.

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

from tensorstage.errors import SpecError
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
             round(r["simulator_error_pct"], 1), r["gloo_s"] * 1e3, round(r["gloo_error_pct"], 1)]
            for r in doc["comparison"]]
    print_table(f"Replay on {doc['links']['ranks']} processes ({doc['network']})",
                ["op", "group", "bytes", "measured ms", "simulator ms", "err %", "gloo model ms", "err %"], rows)
    fits = [[f"{f['tier']} {f['name']}", f["latency_s"] * 1e6, f["bandwidth_Bps"] / 1e6,
             round(f["bandwidth_vs_emulated_pct"], 1), f["cases"], round(f["rel_rms_pct"], 1)] for f in doc["fit"]]
    print_table("Alpha-beta fit per tier", ["tier", "latency us", "MB/s", "vs link %", "cases", "rel RMS %"], fits)
    for n in doc["notes"]:
        typer.echo(f"note: {n}")


def register(app: typer.Typer) -> None:
    @app.command("replay")
    def replay(
        bench: bool = typer.Option(False, "--bench", help="Run the collective/send-recv microbenchmark sweep."),
        ranks: int = typer.Option(8, "--ranks", help="Processes to start."),
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
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Run communication on real processes (gloo) over emulated links and compare with the model."""
        from tensorstage.replay.bench import bench_dict, make_links, run_microbench
        from tensorstage.replay.report import bench_markdown, write_report

        if not bench:
            raise SpecError("replay", "give --bench (the microbenchmark sweep)")
        if report is not None:
            from tensorstage.fileio import require_replaceable_dir

            require_replaceable_dir(report, "report")
        links = make_links(ranks, link_GBps, link_latency_us, node_size, inter_GBps, inter_latency_us)
        res = run_microbench(links, network=network, ops=parse_ops(ops), sizes_bytes=parse_sizes(sizes),
                             warmup=warmup, repeats=repeats, timeout_s=timeout_s, max_bytes=int(max_gib * 2**30))
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
        links, samples, network = bench_from_dict(data)
        base = load_base_system(system)
        fits = fit_tiers(compare(samples, links), links, min_kib * 1024)
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
