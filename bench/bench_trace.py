"""Benchmark Chakra ET trace synthesis at scale (issue 5): ranks, wall s, CPU s, peak RSS, MB/s.

Usage::

    .venv/bin/python bench/bench_trace.py --dp 32 256            # 4,096 and 32,768 ranks
    .venv/bin/python bench/bench_trace.py --dp 1024 --out /tmp/x  # 131,072 ranks
    .venv/bin/python bench/bench_trace.py --source mypkg.lower:programs_for_bench

Each size runs in a fresh subprocess so peak RSS is per size. The program source is pluggable:
``--source module:function`` names a callable ``(tp, pp, dp, microbatches) -> (programs, mesh)``.
The default, :func:`real_405b`, lowers the ``llama3.1-405b`` preset with the real lowering
(:func:`tensorstage.lower.lower`: graph, block lowering with TP+SP collectives, 1F1B step
assembly with Megatron DP buckets); ``--source :synthetic_405b`` keeps the earlier synthetic
stand-in (formula FLOPs, one DP bucket per layer) for comparison. Lowering time is reported
separately (``lower s``) and is included in ``wall s``.
The sequential write floor is measured by writing a 1 GiB file with fsync on the output disk.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from tensorstage.parallel.mesh import Mesh
from tensorstage.schedule.program import CollKind, NodeKind, Program

# Llama-3.1-405B (HF config): hidden 16384, FFN 53248, 128 heads, 8 KV heads, head dim 128, 126 layers.
HIDDEN, FFN, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 16384, 53248, 128, 8, 128, 126
SEQ, MICRO_BATCH, DTYPE_BYTES = 8192, 1, 2


def _layer_ops(tp: int) -> tuple[list[tuple[str, int, int]], list[tuple[str, int, int]]]:
    """Per-layer (name, FLOPs, bytes) on one TP rank: 15 forward and 25 backward COMP nodes."""
    t, h, f, b = SEQ * MICRO_BATCH, HIDDEN, FFN, DTYPE_BYTES
    kv = KV_HEADS * HEAD_DIM
    act = t * h * b

    def mm(n_in: int, n_out: int) -> tuple[int, int]:  # (FLOPs, bytes read + written) of x @ W
        return 2 * t * n_in * n_out // tp, (t * n_in + n_in * n_out // tp + t * n_out // tp) * b

    attn_flops = 2 * 2 * t * SEQ * h // tp // 2  # QK^T and PV, causal half
    ew = (5 * t * h, 2 * act)  # elementwise-ish op on the full hidden state
    fwd = [("attn_norm", *ew), ("q_proj", *mm(h, h)), ("k_proj", *mm(h, kv)), ("v_proj", *mm(h, kv)),
           ("rope_q", 6 * t * h // tp, 2 * act // tp), ("rope_k", 6 * t * kv // tp, 2 * t * kv * b // tp),
           ("flash_attn", attn_flops, 4 * act // tp), ("o_proj", *mm(h, h)), ("residual1", t * h, 3 * act),
           ("mlp_norm", *ew), ("gate_proj", *mm(h, f)), ("up_proj", *mm(h, f)),
           ("silu_mul", 4 * t * f // tp, 3 * t * f * b // tp), ("down_proj", *mm(f, h)), ("residual2", t * h, 3 * act)]
    bwd = []
    for name, fl, by in reversed(fwd):
        if name.endswith("_proj"):
            bwd += [(f"{name}_dgrad", fl, by), (f"{name}_wgrad", fl, by)]
        elif name == "flash_attn":
            bwd += [("flash_attn_bwd", 2 * fl + fl // 2, 2 * by), ("flash_attn_recompute", fl // 2, by)]
        else:
            bwd.append((f"{name}_bwd", 2 * fl, 2 * by))
    # the residual stream's gradient sums (one per sublayer): 7 x 2 + 2 + 7 + 2 = 25
    bwd += [("mlp_residual_grad_sum", t * h, 3 * act), ("attn_residual_grad_sum", t * h, 3 * act)]
    assert len(fwd) == 15 and len(bwd) == 25, (len(fwd), len(bwd))
    return fwd, bwd


def _stage_layers(pp: int) -> list[int]:
    base, extra = divmod(LAYERS, pp)
    return [base + (1 if s < extra else 0) for s in range(pp)]


def synthetic_405b(tp: int, pp: int, dp: int, microbatches: int) -> tuple[list[Program], Mesh]:
    """A 1F1B training step per pipeline stage, structured like the real lowering will be."""
    mesh = Mesh.create([("tp", tp), ("dp", dp), ("pp", pp)])
    fwd_ops, bwd_ops = _layer_ops(tp)
    act_bytes = SEQ * MICRO_BATCH * HIDDEN * DTYPE_BYTES
    layer_params = HIDDEN * (HIDDEN + 2 * KV_HEADS * HEAD_DIM) + HIDDEN * HIDDEN + 3 * HIDDEN * FFN
    bucket_bytes = layer_params // tp * DTYPE_BYTES
    programs = []
    for stage, n_layers in enumerate(_stage_layers(pp)):
        p = Program(class_key={"pp": stage})
        first, last = stage == 0, stage == pp - 1
        warmup = min(pp - stage - 1, microbatches)
        order = [("F", m) for m in range(warmup)]
        for i in range(microbatches - warmup):
            order += [("F", warmup + i), ("B", i)]
        order += [("B", m) for m in range(microbatches - warmup, microbatches)]
        prev_action_end: int | None = None
        fwd_end: dict[int, int] = {}
        for kind, m in order:
            ctrl = (prev_action_end,) if prev_action_end is not None else ()
            if kind == "F":
                if first:
                    last_id = p.add(f"mb{m}.embed", NodeKind.COMP, ctrl_deps=ctrl, flops=0,
                                    tensor_bytes=2 * act_bytes, microbatch=m).id
                else:
                    last_id = p.add(f"mb{m}.recv_act", NodeKind.RECV, ctrl_deps=ctrl, comm_bytes=act_bytes,
                                    peer_axis="pp", peer_offset=-1, tag=2 * m, microbatch=m).id
                for layer in range(n_layers):
                    for name, fl, by in fwd_ops:
                        last_id = p.add(f"L{layer}.mb{m}.{name}", NodeKind.COMP, data_deps=(last_id,), flops=fl,
                                        tensor_bytes=by, layer=layer, microbatch=m).id
                        if name in ("o_proj", "down_proj"):
                            last_id = p.add(f"L{layer}.mb{m}.{name}.tp_ar", NodeKind.COLL, data_deps=(last_id,),
                                            comm=CollKind.ALL_REDUCE, comm_bytes=act_bytes, axes=("tp",),
                                            layer=layer, microbatch=m, category="comm").id
                if not last:
                    last_id = p.add(f"mb{m}.send_act", NodeKind.SEND, data_deps=(last_id,), comm_bytes=act_bytes,
                                    peer_axis="pp", peer_offset=1, tag=2 * m, microbatch=m).id
                fwd_end[m] = last_id
            else:
                deps = (fwd_end[m],)
                if not last:
                    last_id = p.add(f"mb{m}.recv_grad", NodeKind.RECV, data_deps=deps, ctrl_deps=ctrl,
                                    comm_bytes=act_bytes, peer_axis="pp", peer_offset=1, tag=2 * m + 1,
                                    microbatch=m).id
                    deps, ctrl = (last_id,), ()
                for layer in reversed(range(n_layers)):
                    for name, fl, by in bwd_ops:
                        last_id = p.add(f"L{layer}.mb{m}.{name}", NodeKind.COMP, data_deps=deps, ctrl_deps=ctrl,
                                        flops=fl, tensor_bytes=by, layer=layer, microbatch=m,
                                        category="bwd_input").id
                        deps, ctrl = (last_id,), ()
                        if name in ("gate_proj_dgrad", "q_proj_dgrad"):
                            last_id = p.add(f"L{layer}.mb{m}.{name}.tp_ar", NodeKind.COLL, data_deps=deps,
                                            comm=CollKind.ALL_REDUCE, comm_bytes=act_bytes, axes=("tp",),
                                            layer=layer, microbatch=m, category="comm").id
                            deps = (last_id,)
                    if m == microbatches - 1 and dp > 1:  # last backward: this layer's grads are final
                        p.add(f"L{layer}.dp_grad_ar", NodeKind.COLL, data_deps=deps, comm=CollKind.ALL_REDUCE,
                              comm_bytes=bucket_bytes, axes=("dp",), layer=layer, category="comm")
                if not first:
                    last_id = p.add(f"mb{m}.send_grad", NodeKind.SEND, data_deps=deps, comm_bytes=act_bytes,
                                    peer_axis="pp", peer_offset=-1, tag=2 * m + 1, microbatch=m).id
            prev_action_end = last_id
        programs.append(p)
    return programs, mesh


def stage_split(layers: int, pp: int) -> list[int]:
    """Layers per stage: an even split, the remainder going to the interior stages first (the first
    and last stages also hold the embedding and the LM head + loss; 126 over 16 -> 7, 8 x 14, 7)."""
    counts = [layers // pp] * pp
    order = list(range(1, pp - 1)) + [0, pp - 1] if pp > 2 else list(range(pp))
    for i in range(layers % pp):
        counts[order[i]] += 1
    return counts


def real_plan(tp: int, pp: int, dp: int, microbatches: int):
    """The issue-5 plan: 1F1B, micro-batch 1, sequence 8192, sequence parallelism, bf16."""
    from tensorstage.parallel.plan import ParallelPlan

    split = stage_split(LAYERS, pp) if LAYERS % pp else None
    return ParallelPlan.parse(dict(tp=tp, pp=pp, dp=dp, sp=tp > 1, schedule="1f1b", seq=SEQ, micro_batch=MICRO_BATCH,
                                   global_batch=dp * MICRO_BATCH * microbatches, dtype="bf16", pp_layer_split=split))


def real_405b(tp: int, pp: int, dp: int, microbatches: int) -> tuple[list[Program], Mesh]:
    """The real lowering of the ``llama3.1-405b`` preset under :func:`real_plan`."""
    from tensorstage.lower import lower
    from tensorstage.model import resolve_model

    lowered = lower(resolve_model("llama3.1-405b"), real_plan(tp, pp, dp, microbatches))
    return lowered.programs, lowered.mesh


def load_source(spec: str):
    """``module:function`` -> the callable (the bench's own module when no module is given)."""
    mod, _, fn = spec.rpartition(":")
    return getattr(importlib.import_module(mod) if mod else sys.modules[__name__], fn)


def measure_write_bandwidth(directory: Path, size_bytes: int = 1 << 30) -> float:
    """Sequential write bandwidth (bytes/s) of a 1 GiB file written in 8 MiB blocks with fsync."""
    path = directory / f".bw-probe-{os.getpid()}"
    block = os.urandom(8 << 20)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(size_bytes // len(block)):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    path.unlink()
    return size_bytes / dt


def run_one(args: argparse.Namespace) -> dict[str, object]:
    """One size in this process: build programs, write, measure (called in a fresh subprocess)."""
    from tensorstage.trace import write_chakra

    source = load_source(args.source)
    t0, c0 = time.perf_counter(), time.process_time()
    programs, mesh = source(args.tp, args.pp, args.one, args.microbatches)
    build_s = time.perf_counter() - t0
    out = Path(args.out) / f"bench_{mesh.world}"
    manifest = write_chakra(programs, mesh, out, workers=args.workers, progress=not args.quiet,
                            inputs={"bench": args.source, "tp": args.tp, "pp": args.pp, "dp": args.one})
    wall = time.perf_counter() - t0
    self_ru = resource.getrusage(resource.RUSAGE_SELF)
    child_ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (time.process_time() - c0) + child_ru.ru_utime + child_ru.ru_stime
    files = manifest["files"]
    result = {"ranks": mesh.world, "wall_s": wall, "build_s": build_s, "cpu_s": cpu,
              "peak_rss_parent_MiB": self_ru.ru_maxrss / 1024, "peak_rss_worker_MiB": child_ru.ru_maxrss / 1024,
              "output_bytes": files["bytes"], "files": files["count"],
              "nodes_per_rank": max(c["nodes"] for c in manifest["classes"].values()),
              "MBps": files["bytes"] / wall / 1e6}
    if not args.keep:
        shutil.rmtree(out)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dp", type=int, nargs="+", default=[32, 256], help="DP degrees (ranks = tp*pp*dp)")
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--pp", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/tensorstage-bench-trace")
    ap.add_argument("--source", default=":real_405b",
                    help="module:function giving (programs, mesh); :real_405b (default) or :synthetic_405b")
    ap.add_argument("--keep", action="store_true", help="keep the written traces")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one DP size here
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"disk free at {out}: {shutil.disk_usage(out).free / 2**30:.1f} GiB")
    floor = measure_write_bandwidth(out)
    print(f"sequential write floor (1 GiB, fsync): {floor / 1e6:.0f} MB/s")
    rows = []
    for dp in args.dp:
        cmd = [sys.executable, __file__, "--one", str(dp), "--tp", str(args.tp), "--pp", str(args.pp),
               "--microbatches", str(args.microbatches), "--workers", str(args.workers), "--out", args.out,
               "--source", args.source] + (["--keep"] if args.keep else []) + (["--quiet"] if args.quiet else [])
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
        rows.append(json.loads(line[7:]))
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Chakra ET synthesis ({args.source}): TP {args.tp} PP {args.pp}, {args.microbatches} microbatches, "
                        f"{args.workers} workers; write floor {floor / 1e6:.0f} MB/s")
    for col in ("ranks", "nodes/rank", "lower s", "wall s", "CPU s", "peak RSS MiB (parent/worker)", "output GB", "MB/s",
                "x floor"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['ranks']:,}", f"{r['nodes_per_rank']:,}", f"{r['build_s']:.2f}", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
                      f"{r['peak_rss_parent_MiB']:.0f} / {r['peak_rss_worker_MiB']:.0f}",
                      f"{r['output_bytes'] / 1e9:.2f}", f"{r['MBps']:.0f}", f"{floor / 1e6 / r['MBps']:.2f}")
    Console(width=150).print(table)
    print("JSON " + json.dumps({"write_floor_MBps": floor / 1e6, "rows": rows}))


if __name__ == "__main__":
    main()
