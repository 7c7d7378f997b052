"""``tensorstage serve MODEL``: simulate serving a model with an engine on a system under a workload.

Thin layer over :func:`tensorstage.api.serve` (and :func:`tensorstage.serve.capacity.find_max_qps`):
parse flags, build the workload, print a table or JSON. Bad input is one line and exit code 2 (``SpecError``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.progress import Progress

from tensorstage import api
from tensorstage.errors import SpecError
from tensorstage.fileio import require_replaceable_dir
from tensorstage.hardware.system import load_system
from tensorstage.model.resolve import resolve_model
from tensorstage.report.console import print_json, print_table
from tensorstage.serve import RequestTable, ServingPlan, Workload, load_profile
from tensorstage.serve.capacity import find_max_qps
from tensorstage.serve.engines import engine_names
from tensorstage.serve.predictor import KV_DTYPES, WEIGHT_BYTES
from tensorstage.serve.report import write_serving_report
from tensorstage.serve.routers import ROUTERS
from tensorstage.serve.timeline import write_serving_trace
from tensorstage.serve.traces import FORMATS, load_trace
from tensorstage.serve.workloads import LENGTHS, lengths_option

#: runs this long show a progress bar (on a terminal, not with --json)
PROGRESS_MIN_REQUESTS = 20_000


def _workload(offline: int | None, qps: float | None, concurrency: int | None, trace: Path | None,
              trace_format: str | None, requests: int, isl: int, osl: int, lengths: str, spread: float,
              prefix_groups: int, prefix_tokens: int, burstiness: float, seed: int) -> Workload | RequestTable:
    modes = [m for m, v in (("--offline", offline), ("--qps", qps), ("--concurrency", concurrency),
                            ("--trace", trace)) if v is not None]
    if len(modes) > 1:
        raise SpecError("workload", f"give one of --offline, --qps, --concurrency, --trace (got {' and '.join(modes)})")
    if trace is not None:
        return load_trace(trace, trace_format)
    lengths, lengths_file = lengths_option(lengths)
    common = dict(input_tokens=isl, output_tokens=osl, lengths=lengths, spread=spread,
                  prefix_groups=prefix_groups, prefix_tokens=prefix_tokens, seed=seed, lengths_file=lengths_file)
    if qps is not None:
        arrival = "poisson" if burstiness == 1.0 else "gamma"
        return Workload(requests, arrival=arrival, rate_per_s=qps, cv=burstiness, **common).check()
    if concurrency is not None:
        return Workload(requests, arrival="closed", concurrency=concurrency, **common).check()
    return Workload(offline if offline is not None else requests, arrival="offline", **common).check()


def _serve(model: str, system: str, engine: str, tp: int, replicas: int, weight_dtype: str, kv_dtype: str | None,
           router: str, workload: Workload | RequestTable, slo_ttft_ms: float | None, slo_tpot_ms: float | None,
           overrides: dict[str, object], json_out: bool, find_max: bool = False,
           disagg: str | None = None, timeline: Path | None = None, decode_system: str | None = None,
           report: Path | None = None, attention_dp: bool = False) -> None:
    if weight_dtype not in WEIGHT_BYTES:
        raise SpecError("--weight-dtype", f"unknown dtype {weight_dtype!r}", WEIGHT_BYTES)
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise SpecError("--kv-dtype", f"unknown dtype {kv_dtype!r}", KV_DTYPES)
    if router not in ROUTERS:
        raise SpecError("--router", f"unknown router {router!r}", ROUTERS)
    for name, val in (("--slo-ttft-ms", slo_ttft_ms), ("--slo-tpot-ms", slo_tpot_ms)):
        if val is not None and not val > 0:
            raise SpecError(name, f"must be > 0, got {val}")
    if report is not None:
        require_replaceable_dir(report, "--report")
    if timeline is not None and timeline.is_dir():
        raise SpecError("--timeline", f"{timeline} is a directory; give a file name such as serve.json")
    spec = resolve_model(model)
    profile = load_profile(engine, **overrides)
    split = None
    if disagg is not None:
        parts = disagg.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
            raise SpecError("--disagg", f"expected P:D with integers >= 1 (prefill:decode replicas), got {disagg!r}")
        split = (int(parts[0]), int(parts[1]))
    plan = ServingPlan(engine=profile, tp=tp, replicas=replicas, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                       router=router, disagg=split, decode_system=decode_system,
                       attention_dp=attention_dp).check()
    replicas = plan.num_replicas()
    ttft = None if slo_ttft_ms is None else slo_ttft_ms / 1e3
    tpot = None if slo_tpot_ms is None else slo_tpot_ms / 1e3
    if find_max:
        if not isinstance(workload, Workload) or workload.arrival == "closed":
            raise SpecError("--find-max-qps", "needs a synthetic open-loop workload (not --trace or --concurrency)")
        cap = find_max_qps(spec, load_system(system), plan, workload, ttft, tpot)
        doc = {"model": spec.name, "system": system, "engine": profile.name, "tp": tp, "replicas": replicas,
               "max_rate_per_s": round(cap.max_rate_per_s, 6), "offline_rate_per_s": round(cap.offline_rate_per_s, 6),
               "limited_by": cap.limited_by,
               "probes": [{"rate_per_s": round(r, 6), "meets_slo": ok} for r, ok in cap.probes],
               "at_max": None if cap.at_max is None else cap.at_max.metrics.summary()}
        if json_out:
            print_json(doc)
        else:
            print_table("Rate search (p99 TTFT and TPOT within the SLOs)", ["rate/s", "meets SLO"],
                        [[p["rate_per_s"], "yes" if p["meets_slo"] else "no"] for p in doc["probes"]])
            why = {"throughput": "; the SLOs hold at the throughput ceiling, so this is that ceiling",
                   "slo": "; an SLO binds below the throughput ceiling", "none": ""}[cap.limited_by]
            print(f"max rate meeting the SLOs: {cap.max_rate_per_s:.4g} requests/s "
                  f"(offline capacity {cap.offline_rate_per_s:.4g} requests/s{why})")
        return
    n_req = len(workload) if isinstance(workload, RequestTable) else workload.num_requests
    kwargs = dict(engine=engine, tp=tp, replicas=plan.replicas, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                  router=router, disagg=split, decode_system=decode_system, attention_dp=attention_dp,
                  slo_ttft_ms=slo_ttft_ms, slo_tpot_ms=slo_tpot_ms, engine_overrides=overrides)
    if n_req >= PROGRESS_MIN_REQUESTS and sys.stderr.isatty() and not json_out:
        with Progress(transient=True) as bar:
            task = bar.add_task("serving", total=n_req)
            served = api.serve(model, system, workload, progress=lambda k: bar.advance(task, k), **kwargs)
    else:
        served = api.serve(model, system, workload, **kwargs)
    result, summary = served.result, served.summary
    if timeline is not None:
        write_serving_trace(result.requests, result.steps, timeline)
    if report is not None:
        write_serving_report(report, result, summary, f"{spec.name} on {system}: {profile.name}, TP{tp} x {replicas}",
                             ttft, tpot)
    doc = summary
    if json_out:
        print_json(doc)
        return
    m = doc
    rows = [[k, m[k]] for k in ("requests", "makespan_s", "output_tokens_per_s", "output_tokens_per_s_per_gpu",
                                "requests_per_s", "goodput_requests_per_s", "slo_attainment", "preemptions",
                                "prefix_hit_rate", "mean_running", "mean_waiting", "mean_kv_use",
                                "kv_capacity_tokens", "steps")]
    print_table(f"{spec.name} on {system}: {profile.name}, TP{tp} x {replicas}", ["metric", "value"],
                [[k, "-" if v is None else v] for k, v in rows])
    lat = [[name, *(m[name][k] for k in ("mean", "p50", "p90", "p99"))] for name in ("ttft_ms", "tpot_ms", "e2e_ms")]
    print_table("Latency (ms)", ["metric", "mean", "p50", "p90", "p99"], lat)


#: serve options a --config file may set: the deployment and engine, not the workload or outputs
CONFIG_KEYS = ("system", "engine", "tp", "replicas", "disagg", "decode_system", "weight_dtype", "kv_dtype", "router",
               "attention_dp", "max_num_seqs", "max_batched_tokens", "block_tokens", "kv_mem_fraction", "gqa_kv_reuse")


def _with_config(ctx: typer.Context, path: Path) -> dict[str, object]:
    """The command's parameters with ``path``'s values where the flag was not given on the command line."""
    import yaml

    from tensorstage.fileio import read_text_file

    try:
        data = yaml.safe_load(read_text_file(path, "serve config"))
    except yaml.YAMLError as exc:
        raise SpecError("--config", f"{path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError("--config", f"{path} must be a mapping of option names to values", CONFIG_KEYS)
    params = dict(ctx.params)
    options = {p.name: p for p in ctx.command.params}
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise SpecError("--config", f"unknown option {key!r} in {path}", CONFIG_KEYS)
        source = ctx.get_parameter_source(key)  # typer may bundle its own click: compare by name
        if source is not None and source.name != "DEFAULT":
            continue  # the command line wins
        try:
            params[key] = None if value is None else options[key].process_value(ctx, value)
        except Exception as exc:  # the option type's BadParameter (click's or typer's bundled copy)
            raise SpecError(f"--config {key}", f"{getattr(exc, 'message', exc)} (in {path})") from None
    return params


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the CLI."""

    @app.command("serve")
    def serve_cmd(
        ctx: typer.Context,
        model: str = typer.Argument(..., help="Model preset, HF config.json or YAML model."),
        config: Path = typer.Option(None, "--config", "-c", help="YAML of deployment options (system, engine, tp, replicas, disagg, dtypes, router, engine knobs; "
                                     "e.g. from best-serving; the workload stays on the command line); "
                                    "flags given on the command line win."),
        system: str = typer.Option("dgx-h100-superpod", "--system", help="System preset or YAML."),
        engine: str = typer.Option("vllm", "--engine", help=f"Engine profile: {', '.join(engine_names())}."),
        tp: int = typer.Option(1, "--tp", help="Tensor-parallel degree per replica."),
        attention_dp: bool = typer.Option(False, "--attention-dp", help="Attention data-parallel over the --tp "
                                          "GPUs, routed experts expert-parallel (MoE)."),
        replicas: int = typer.Option(1, "--replicas", help="Model replicas."),
        disagg: str = typer.Option(None, "--disagg", help="Disaggregated P:D prefill:decode replicas "
                                   "(replaces --replicas)."),
        decode_system: str = typer.Option(None, "--decode-system", help="System of the decode pool with --disagg "
                                          "(heterogeneous pools; default: --system)."),
        weight_dtype: str = typer.Option("bf16", "--weight-dtype", help=f"Weights: {', '.join(WEIGHT_BYTES)}."),
        kv_dtype: str = typer.Option(None, "--kv-dtype", help=f"KV cache: {', '.join(KV_DTYPES)} (default: 16-bit)."),
        router: str = typer.Option("round_robin", "--router", help=f"Router: {', '.join(ROUTERS)}."),
        offline: int = typer.Option(None, "--offline", help="N requests all at t=0 (throughput benchmark)."),
        qps: float = typer.Option(None, "--qps", help="Poisson arrivals at this rate (requests/s)."),
        concurrency: int = typer.Option(None, "--concurrency", help="Closed loop with this many clients."),
        trace: Path = typer.Option(None, "--trace", help="Replay a trace file (Azure CSV, Mooncake JSONL, BurstGPT CSV)."),
        trace_format: str = typer.Option(None, "--trace-format", help=f"Trace format: {', '.join(FORMATS)} (default: guessed)."),
        requests: int = typer.Option(1000, "--requests", help="Requests for --qps / --concurrency."),
        isl: int = typer.Option(1024, "--isl", help="Input (prompt) tokens per request (mean)."),
        osl: int = typer.Option(256, "--osl", help="Output tokens per request (mean)."),
        lengths: str = typer.Option("fixed", "--lengths", help=f"Length distribution: {', '.join(LENGTHS)}; or a CSV file of "
                                     "input_length,output_length rows to draw requests from."),
        spread: float = typer.Option(0.0, "--spread", help="Relative spread of lengths (std/mean)."),
        burstiness: float = typer.Option(1.0, "--burstiness", help="CV of inter-arrival gaps (1 = Poisson)."),
        prefix_groups: int = typer.Option(0, "--prefix-groups", help="Shared-prefix groups (system prompts)."),
        prefix_tokens: int = typer.Option(0, "--prefix-tokens", help="Tokens of each shared prefix."),
        slo_ttft_ms: float = typer.Option(None, "--slo-ttft-ms", help="TTFT SLO for goodput (ms)."),
        slo_tpot_ms: float = typer.Option(None, "--slo-tpot-ms", help="TPOT SLO for goodput (ms)."),
        max_num_seqs: int = typer.Option(None, "--max-num-seqs", help="Override the profile's max sequences."),
        max_batched_tokens: int = typer.Option(None, "--max-batched-tokens", help="Override the token budget per engine step (0 = no budget)."),
        block_tokens: int = typer.Option(None, "--block-tokens", help="Override the KV block size."),
        kv_mem_fraction: float = typer.Option(None, "--kv-mem-fraction", help="Override the memory fraction."),
        gqa_kv_reuse: bool = typer.Option(None, "--gqa-kv-reuse/--no-gqa-kv-reuse",
                                          help="Decode attention reads each KV head once per query-head group "
                                          "(default: the profile's; off = TensorRT-LLM before 0.7)."),
        seed: int = typer.Option(0, "--seed", help="Workload seed."),
        find_max: bool = typer.Option(False, "--find-max-qps", help="Bisect the highest Poisson rate whose "
                                      "p99 TTFT/TPOT meet the SLOs."),
        timeline: Path = typer.Option(None, "--timeline", help="Write a Perfetto/Chrome trace JSON (a track per "
                                      "replica and per request)."),
        report: Path = typer.Option(None, "--report", help="Write report.md, result.json and latency/load plots "
                                    "into this directory."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Simulate request-level serving: TTFT, TPOT, E2E percentiles, throughput, goodput."""
        if config is not None:
            p = _with_config(ctx, config)
            system, engine, tp, replicas, disagg, decode_system = (p["system"], p["engine"], p["tp"], p["replicas"],
                                                                   p["disagg"], p["decode_system"])
            weight_dtype, kv_dtype, router, attention_dp = p["weight_dtype"], p["kv_dtype"], p["router"], p["attention_dp"]
            max_num_seqs, max_batched_tokens = p["max_num_seqs"], p["max_batched_tokens"]
            block_tokens, kv_mem_fraction, gqa_kv_reuse = p["block_tokens"], p["kv_mem_fraction"], p["gqa_kv_reuse"]
        wl = _workload(offline, qps, concurrency, trace, trace_format, requests, isl, osl, lengths, spread, prefix_groups,
                       prefix_tokens, burstiness, seed)
        overrides = {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_batched_tokens,
                     "block_tokens": block_tokens, "kv_mem_fraction": kv_mem_fraction, "gqa_kv_reuse": gqa_kv_reuse}
        _serve(model, system, engine, tp, replicas, weight_dtype, kv_dtype, router, wl, slo_ttft_ms, slo_tpot_ms,
               overrides, json_out, find_max, disagg, timeline, decode_system, report, attention_dp)


__all__ = ["register"]
