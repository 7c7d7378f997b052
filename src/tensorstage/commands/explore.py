"""``tensorstage explore`` and ``tensorstage best-plan``: design-space search (:mod:`tensorstage.explore`).

* ``explore SPACE.yaml --agent ga --budget N --out DIR [--workers W | --ray [--ray-address A]]``:
  search a space file; ``DIR`` gets the trial store (``study.sqlite``, resumed by re-running the
  same command), ``trials.csv``, ``pareto.csv``, ``sensitivity.csv``, ``summary.json``,
  ``convergence.png`` and ``best_plan.yaml`` (runs unchanged with ``simulate -c``).
* ``best-plan MODEL --system SYS --gpus N --global-batch B --seq S [--objective ...]``: screen every
  training layout in closed form, simulate the best few, print the ranking.
* ``best-serving MODEL --system SYS --gpus N [--dtype fp8] [--isl --osl --slo-ttft-ms --slo-tpot-ms]``:
  simulate every TP x replicas deployment (and prefill:decode split with ``--disagg``) of the GPUs
  with the serving simulator, print the ranking, write the best as a ``serve --config`` YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tensorstage.errors import SpecError


def _explore(space_file: Path, agent: str, budget: int | None, out: Path, workers: int, ray: bool,
             ray_address: str | None, seed: int, batch: int, evaluator: str | None, json_out: bool = False) -> None:
    from tensorstage.explore.executors import make_executor
    from tensorstage.explore.outputs import write_outputs
    from tensorstage.explore.search import run_study
    from tensorstage.explore.space import load_space

    space = load_space(space_file)
    if evaluator is not None and evaluator not in ("full", "fast", "screened"):
        raise SpecError("evaluator", f"unknown evaluator {evaluator!r}", ("full", "fast", "screened"))
    if out.exists() and not out.is_dir():
        raise SpecError("out", f"{out} is a file; give a folder")
    executor = make_executor(workers, ray or ray_address is not None, ray_address)
    try:
        res = run_study(space, agent, budget, out, seed=seed, batch=batch, executor=executor, evaluator=evaluator)
    finally:
        executor.close()
    files = write_outputs(res, out)
    if json_out:  # the summary the study wrote, with where each output is
        import json

        from tensorstage.report.console import print_json

        print_json({**json.loads(files["summary"].read_text()), "files": {k: str(v) for k, v in sorted(files.items())}})
        return
    best = res.best()
    typer.echo(f"{res.evaluations} evaluations, {len(res.trials)} trials ({agent}); outputs in {out}")
    if best is None:
        typer.echo("no feasible configuration found")
    else:
        objs = ", ".join(f"{o.name}={v:.6g}" for o, v in zip(space.objectives, best.objectives or [], strict=True))
        typer.echo(f"best: trial {best.number}: {objs}; plan {files.get('best_plan')}")


#: plan fields best-plan sets from its own options (``--fix`` may not pin them a second way)
_OWN_OPTIONS = {"seq": "--seq", "global_batch": "--global-batch", "dtype": "--dtype"}


def pinned_fields(items: list[str]) -> dict[str, Any]:
    """``--fix KEY=VALUE`` items as plan fields; each VALUE read as YAML (``false``, ``8``, ``[1, 2]``),
    each checked as its plan field (``ParallelPlan.check_field``); a malformed item, an unknown or
    repeated key, or a key with its own option is one :class:`SpecError` naming ``--fix``."""
    import yaml

    from tensorstage.parallel.plan import ParallelPlan

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise SpecError("--fix", f"expected KEY=VALUE, got {item!r}")
        if key in _OWN_OPTIONS:
            raise SpecError("--fix", f"{key} has its own option: use {_OWN_OPTIONS[key]}")
        if key in out:
            raise SpecError("--fix", f"{key} given twice")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out[key] = ParallelPlan.check_field(key, value, "--fix")
    return out


def _best_plan(model: str, system: str, gpus: int, global_batch: int, seq: int, objective: str, dtype: str,
               top: int, out: Path | None, json_out: bool, workers: int = 1, uneven: bool = True,
               fixed: dict[str, Any] | None = None, memory_reserve_gib: float = 0.0) -> None:
    import yaml

    from tensorstage.explore.bestplan import best_plan, rank_table
    from tensorstage.explore.search import PRUNE_MEMORY_FRACTION
    from tensorstage.fileio import write_text_atomic
    from tensorstage.report.console import print_json, print_table

    bp = best_plan(model, system, gpus, global_batch, seq, objective=objective, dtype=dtype, top=top, workers=workers,
                   uneven=uneven, fixed=fixed or None, memory_reserve_bytes=memory_reserve_gib * 2**30)
    rows = rank_table(bp)
    best = bp.best
    if out is not None and best is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, yaml.safe_dump(dict(sorted(best.plan.items())), sort_keys=True))
    if json_out:
        print_json({"model": model, "system": system, "gpus": gpus, "objective": objective,
                    "enumerated": bp.enumerated, "legal": bp.legal, "ranking": rows,
                    "best_plan": None if best is None else dict(sorted(best.plan.items()))})
    elif rows:
        print_table(f"{model} on {gpus} x {system}: {bp.legal:,} legal layouts of {bp.enumerated:,} screened, "
                    f"top {len(rows)} simulated", list(rows[0]),
                    [[f"{v:.4g}" if isinstance(v, float) else v for v in r.values()] for r in rows])
    if best is not None:
        if out is not None and not json_out:
            typer.echo(f"best plan: {out}")
        return
    # nothing fits: say why on stderr and exit 1 (a search without an answer, not bad input)
    reserve = f" less the {memory_reserve_gib:g} GiB reserve" if memory_reserve_gib else ""
    more = "more GPUs" + (" or fewer --fix pins" if fixed else "")
    if rows:
        why = (f"none of the {len(rows)} simulated layouts (the best screened) fits in memory{reserve}; "
               f"raise --top to simulate more of them, or try {more}")
    else:
        why = (f"none of the {bp.legal:,} legal layouts fits in memory{reserve} by the screen's estimate "
               f"(it prunes above {PRUNE_MEMORY_FRACTION:g} x the limit); try {more}")
    typer.echo(f"best-plan: {why}", err=True)
    raise typer.Exit(1)


def _best_serving(model: str, system: str, gpus: int, dtype: str, kv_dtype: str | None, engine: str,
                  requests: int | None, isl: int, osl: int, lengths: str, spread: float, seed: int,
                  slo_ttft_ms: float | None, slo_tpot_ms: float | None, disagg: bool,
                  overrides: dict[str, object], out: Path | None, json_out: bool) -> None:
    import yaml

    from tensorstage.explore.bestserving import best_serving, rank_rows, serve_config
    from tensorstage.fileio import write_text_atomic
    from tensorstage.report.console import print_json, print_table
    from tensorstage.serve import Workload
    from tensorstage.serve.predictor import KV_DTYPES, WEIGHT_BYTES
    from tensorstage.serve.workloads import lengths_option

    if dtype not in WEIGHT_BYTES:
        raise SpecError("--dtype", f"unknown dtype {dtype!r}", WEIGHT_BYTES)
    if kv_dtype is None:
        kv_dtype = dtype if dtype in KV_DTYPES and dtype not in ("bf16", "fp16") else None
    elif kv_dtype not in KV_DTYPES:
        raise SpecError("--kv-dtype", f"unknown dtype {kv_dtype!r}", KV_DTYPES)
    for name, val in (("--slo-ttft-ms", slo_ttft_ms), ("--slo-tpot-ms", slo_tpot_ms)):
        if val is not None and not val > 0:
            raise SpecError(name, f"must be > 0, got {val}")
    dist, lengths_file = lengths_option(lengths)
    from tensorstage.explore.bestserving import AUTO_START_REQUESTS

    wl = Workload(requests or AUTO_START_REQUESTS, isl, osl, lengths=dist, spread=spread, seed=seed,
                  lengths_file=lengths_file).check()
    bs = best_serving(model, system, gpus, engine=engine, weight_dtype=dtype, kv_dtype=kv_dtype, workload=wl,
                      auto_requests=requests is None,
                      slo_ttft_s=None if slo_ttft_ms is None else slo_ttft_ms / 1e3,
                      slo_tpot_s=None if slo_tpot_ms is None else slo_tpot_ms / 1e3, disagg=disagg,
                      engine_overrides=overrides)
    rows = rank_rows(bs)
    best = bs.best
    cfg = None if best is None else serve_config(bs)
    if out is not None and cfg is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, yaml.safe_dump(cfg, sort_keys=True))
    if json_out:
        print_json({"model": bs.model, "system": system, "gpus": gpus, "objective": bs.objective,
                    "settings": bs.settings, "ranking": rows, "best": None if best is None else best.label,
                    "serve_config": cfg, "note": bs.note or None})
        return
    cols = list(rows[0])
    print_table(f"{bs.model} on {gpus} x {system} ({bs.settings['engine']}, {dtype}, "
                f"{bs.settings['requests']:,} requests per run): ranked by {bs.objective}",
                cols, [[f"{v:.5g}" if isinstance(v, float) else "-" if v is None else v for v in r.values()]
                       for r in rows])
    if bs.note:
        typer.echo(f"note: {bs.note}")
    if best is None:
        typer.echo("no deployment fits")
    else:
        typer.echo(f"best: {best.label}" + (f"; serve config: {out}" if out is not None else ""))


def register(app: typer.Typer) -> None:
    @app.command("explore")
    def explore(
        space_file: Path = typer.Argument(..., help="Space YAML (parameters, constraints, objectives)."),
        agent: str = typer.Option("random", "--agent", help="grid, random, random_walk, aco, ga, nsga2, tpe "
                                  "or module:Class."),
        budget: int | None = typer.Option(None, "--budget", help="Evaluations (default: the space's budget)."),
        out: Path = typer.Option(..., "--out", help="Output folder (re-run to resume)."),
        workers: int = typer.Option(1, "--workers", help="Local worker processes."),
        ray: bool = typer.Option(False, "--ray", help="Evaluate on Ray (a local cluster unless --ray-address)."),
        ray_address: str | None = typer.Option(None, "--ray-address", help="Address of a running Ray cluster."),
        seed: int = typer.Option(0, "--seed", help="Agent seed."),
        batch: int = typer.Option(8, "--batch", help="Configurations asked per round."),
        evaluator: str | None = typer.Option(None, "--evaluator", help="full, fast or screened "
                                             "(default: the space's)."),
        json_out: bool = typer.Option(False, "--json", help="Print the study's summary as JSON."),
    ) -> None:
        """Search a design space: trials, best plan, Pareto front, convergence plot."""
        if budget is not None and budget < 1:
            raise SpecError("budget", f"must be >= 1, got {budget}")
        if batch < 1:
            raise SpecError("batch", f"must be >= 1, got {batch}")
        _explore(space_file, agent, budget, out, workers, ray, ray_address, seed, batch, evaluator, json_out)

    @app.command("best-plan")
    def best_plan_cmd(
        model: str = typer.Argument(..., help="Model preset, HF config.json or YAML."),
        system: str = typer.Option(..., "--system", help="System preset or YAML."),
        gpus: int = typer.Option(..., "--gpus", help="GPU count."),
        global_batch: int = typer.Option(..., "--global-batch", help="Sequences per step."),
        seq: int = typer.Option(2048, "--seq", help="Sequence length."),
        objective: str = typer.Option("step_time_s", "--objective", help="step_time_s, mfu, tokens_per_s, "
                                      "peak_memory_bytes or gpu_s_per_token."),
        dtype: str = typer.Option("bf16", "--dtype", help="Compute dtype."),
        top: int = typer.Option(8, "--top", help="Best-screened layouts simulated in full."),
        workers: int = typer.Option(1, "--workers", help="Simulate on a pool of this many processes."),
        even_splits: bool = typer.Option(False, "--even-splits", help="Only layer counts pp*vpp divides "
                                         "(no uneven stages or model chunks, as Megatron-LM before Core)."),
        fix: list[str] = typer.Option([], "--fix", help="Pin a plan field, KEY=VALUE (repeatable; VALUE as in a "
                                      "plan YAML), e.g. --fix zero=0 --fix recompute=full --fix sp=false."),
        memory_reserve_gib: float = typer.Option(
            0.0, "--memory-reserve-gib", help="HBM (GiB) to keep free for what is not modelled: CUDA context, "
            "NCCL buffers, allocator fragmentation; layouts above HBM less this are out of memory."),
        out: Path | None = typer.Option(None, "--out", help="Write the best plan YAML here."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Best training layout (TP, PP, DP, micro-batch, interleaving, recompute, ZeRO) for a model."""
        for name, v in (("gpus", gpus), ("global_batch", global_batch), ("seq", seq)):
            if v < 1:
                raise SpecError(name, f"must be >= 1, got {v}")
        if not memory_reserve_gib >= 0:
            raise SpecError("--memory-reserve-gib", f"must be >= 0, got {memory_reserve_gib}")
        if out is not None and out.is_dir():
            raise SpecError("out", f"{out} is a directory; give a file path (e.g. best.yaml)")
        _best_plan(model, system, gpus, global_batch, seq, objective, dtype, top, out, json_out, workers,
                   not even_splits, pinned_fields(fix), memory_reserve_gib)

    @app.command("best-serving")
    def best_serving_cmd(
        model: str = typer.Argument(..., help="Model preset, HF config.json or YAML."),
        system: str = typer.Option(..., "--system", help="System preset or YAML."),
        gpus: int = typer.Option(..., "--gpus", help="GPUs to deploy on."),
        dtype: str = typer.Option("bf16", "--dtype", help="Weight dtype (fp8/int8 also quantize the KV cache)."),
        kv_dtype: str | None = typer.Option(None, "--kv-dtype", help="KV-cache dtype (default: from --dtype)."),
        engine: str = typer.Option("trtllm", "--engine", help="Engine profile: vllm, sglang, trtllm, static."),
        requests: int | None = typer.Option(None, "--requests", help="Requests per simulation (default: 2,000, "
                                            "lengthened x4 up to 32,000 until every deployment reaches a steady "
                                            "state)."),
        isl: int = typer.Option(1024, "--isl", help="Input tokens per request (mean)."),
        osl: int = typer.Option(256, "--osl", help="Output tokens per request (mean)."),
        lengths: str = typer.Option("fixed", "--lengths", help="Length distribution: fixed, uniform, normal, "
                                    "lognormal; or a CSV file of input_length,output_length rows."),
        spread: float = typer.Option(0.0, "--spread", help="Relative spread of lengths (std/mean)."),
        seed: int = typer.Option(0, "--seed", help="Workload seed."),
        slo_ttft_ms: float | None = typer.Option(None, "--slo-ttft-ms", help="p99 TTFT SLO: rank by max QPS."),
        slo_tpot_ms: float | None = typer.Option(None, "--slo-tpot-ms", help="p99 TPOT SLO: rank by max QPS."),
        disagg: bool = typer.Option(False, "--disagg", help="Also every prefill:decode split of the replicas."),
        max_num_seqs: int | None = typer.Option(None, "--max-num-seqs", help="Override the engine's max sequences."),
        max_batched_tokens: int | None = typer.Option(None, "--max-batched-tokens", help="Override the token "
                                                      "budget per engine step (0 = no budget)."),
        out: Path | None = typer.Option(None, "--out", help="Write the best as a `serve --config` YAML here."),
        json_out: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Best serving deployment (TP x replicas, optionally disaggregated) of a model on N GPUs."""
        for name, v in (("--gpus", gpus), ("--requests", requests), ("--isl", isl), ("--osl", osl)):
            if v is not None and v < 1:
                raise SpecError(name, f"must be >= 1, got {v}")
        if out is not None and out.is_dir():
            raise SpecError("--out", f"{out} is a directory; give a file path (e.g. best_serving.yaml)")
        _best_serving(model, system, gpus, dtype, kv_dtype, engine, requests, isl, osl, lengths, spread, seed,
                      slo_ttft_ms, slo_tpot_ms, disagg,
                      {"max_num_seqs": max_num_seqs, "max_num_batched_tokens": max_batched_tokens}, out, json_out)
