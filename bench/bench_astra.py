"""Side by side: our simulator and ASTRA-sim (replay and roofline) on the same Chakra traces.

Reproduces the table of ``docs/astra-sim.md``. ASTRA-sim is not part of tensorstage: build it from
its public sources and pass its congestion-unaware analytical binary::

    python bench/bench_astra.py --astra-bin PATH/AstraSim_Analytical_Congestion_Unaware --work DIR [PLAN ...]

For each plan: ``tensorstage generate --system SYS --astra-config`` into ``DIR/PLAN``, then
``tensorstage simulate --trace`` and the two ASTRA command lines of ``astra_commands.sh``, each in
its own process; wall time, CPU time and peak resident memory are those of that process (Linux
``getrusage`` of the child). ASTRA's step time is the largest ``sys[i] finished, T cycles`` (1 cycle
= 1 ns); a plan counts as finished only when every rank printed that line. Results go to
``DIR/results.json`` and a Markdown table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SYSTEM = "dgx-h100-superpod"
#: every plan key the table's plans rely on, pinned: later flags override, and the command's own
#: default plan (TP 2 x PP 2 x DP 2, SP, ZeRO-1, selective recompute, Megatron kernels) must not leak into a row
COMMON = ["--tp", "1", "--pp", "1", "--dp", "1", "--cp", "1", "--ep", "1", "--no-sp", "--zero", "0",
          "--recompute", "none", "--schedule", "1f1b", "--seq", "2048", "--micro-batch", "1",
          "--no-megatron-fusions"]
#: name -> (model, plan flags, DP crosses nodes)
PLANS: dict[str, tuple[str, list[str], bool]] = {
    "dp8": ("gpt3-350m", ["--dp", "8", "--zero", "0", "--global-batch", "16"], False),
    "zero3-dp8": ("gpt3-350m", ["--dp", "8", "--zero", "3", "--global-batch", "16"], False),
    "tp8-sp": ("gpt3-1.3b", ["--tp", "8", "--sp", "--global-batch", "4"], False),
    "tp2-pp4-1f1b": ("gpt3-1.3b", ["--tp", "2", "--pp", "4", "--schedule", "1f1b", "--global-batch", "16"], False),
    "tp2-pp4-interleaved": ("gpt3-1.3b", ["--tp", "2", "--pp", "4", "--vpp", "2", "--schedule", "interleaved",
                                          "--global-batch", "16"], False),
    "ep8-dp8": ("mixtral-8x7b", ["--ep", "8", "--dp", "8", "--zero", "1", "--global-batch", "8", "--seq", "1024"],
                False),
    "tp2-cp4": ("llama3-8b", ["--tp", "2", "--cp", "4", "--global-batch", "2", "--seq", "8192"], False),
    "decode-tp8": ("llama3-8b", ["--tp", "8", "--phase", "decode", "--context", "4096", "--global-batch", "32",
                                 "--seq", "4096", "--micro-batch", "32"], False),
    "tp8-pp2-dp4": ("gpt3-6.7b", ["--tp", "8", "--pp", "2", "--dp", "4", "--zero", "1", "--global-batch", "32"],
                    True),
    "tp8-dp8-zero1": ("gpt3-6.7b", ["--tp", "8", "--dp", "8", "--zero", "1", "--global-batch", "16"], True),
    "tp8-pp4-dp16": ("gpt3-13b", ["--tp", "8", "--pp", "4", "--dp", "16", "--zero", "1", "--global-batch", "64"],
                     True),
}

_MEASURE = ("import resource, subprocess, sys, time\n"
            "t = time.perf_counter(); p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "u = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "sys.stdout.write(p.stdout + p.stderr)\n"
            "sys.stderr.write('\\n@@ %d %f %f %d' % (p.returncode, time.perf_counter() - t, u.ru_utime + u.ru_stime,"
            " u.ru_maxrss * 1024))\n")


def measured(cmd: list[str], timeout_s: float, cwd: Path | None = None) -> tuple[str, dict[str, float]]:
    """Run ``cmd`` in a fresh process; its output, exit code, wall and CPU seconds and peak RSS bytes."""
    p = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, timeout=timeout_s,
                       cwd=cwd)
    rc, wall, cpu, rss = p.stderr.rsplit("@@ ", 1)[1].split()
    return p.stdout, {"rc": int(rc), "wall_s": float(wall), "cpu_s": float(cpu), "rss_bytes": int(rss)}


def run_astra(line: str, binary: str, world: int, timeout_s: float, cwd: Path) -> dict[str, object]:
    """One ASTRA-sim run; its ``log/`` folder goes into ``cwd`` (the plan's folder)."""
    cmd = line.split()
    cmd[0] = binary
    out, m = measured(cmd, timeout_s, cwd)
    done = {int(r): int(c) for r, c in re.findall(r"sys\[(\d+)\] finished, (\d+) cycles", out)}
    return {**m, "finished": len(done), "world": world, "step_s": max(done.values()) * 1e-9 if done else None}


def run_plan(name: str, work: Path, binary: str, timeout_s: float) -> dict[str, object]:
    model, flags, cross = PLANS[name]
    d = work / name
    cli = [sys.executable, "-m", "tensorstage.cli"]
    gen = [*cli, "generate", model, *COMMON, *flags, "--system", SYSTEM, "--astra-config", "--workers", "1",
           "--no-progress", "--json", "--out", str(d)]
    subprocess.run(gen, check=True, capture_output=True)
    world = json.loads((d / "manifest.json").read_text())["world"]
    out, ours = measured([*cli, "simulate", "--trace", str(d), "--json", "--full"], timeout_s)
    ours["step_s"] = json.loads(out[out.index("{"):])["step_time_s"] if ours["rc"] == 0 else None
    lines = [x for x in (d / "astra_commands.sh").read_text().splitlines() if x and not x.startswith("#")]
    return {"model": model, "flags": " ".join(COMMON + flags), "world": world, "cross_node_dp": cross,
            "ours": ours, "replay": run_astra(lines[0], binary, world, timeout_s, d),
            "roofline": run_astra(lines[1], binary, world, timeout_s, d)}


def table(results: dict[str, dict]) -> str:
    head = ("| plan | ranks | DP across nodes | ASTRA replay (s) | ASTRA roofline (s) | ours (s) | replay / ours | "
            "roofline / ours | ranks finished (replay, roofline) | wall s: ours / replay / roofline | "
            "CPU s: ours / replay / roofline | peak RSS MB: ours / replay / roofline |")
    rows = [head, "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for name, r in results.items():
        o, a, b = r["ours"], r["replay"], r["roofline"]
        if o.get("step_s") is None or a.get("step_s") is None or b.get("step_s") is None:
            rows.append(f"| {name} | {r['world']} | - | failed | | | | | | | | |")
            continue
        rows.append(
            f"| {name} | {r['world']} | {'yes' if r['cross_node_dp'] else 'no'} | {a['step_s']:.4f} | "
            f"{b['step_s']:.4f} | {o['step_s']:.4f} | {a['step_s'] / o['step_s']:.3f} | "
            f"{b['step_s'] / o['step_s']:.3f} | {a['finished']}/{r['world']}, {b['finished']}/{r['world']} | "
            f"{o['wall_s']:.1f} / {a['wall_s']:.1f} / {b['wall_s']:.1f} | "
            f"{o['cpu_s']:.1f} / {a['cpu_s']:.1f} / {b['cpu_s']:.1f} | "
            f"{o['rss_bytes'] / 1e6:.0f} / {a['rss_bytes'] / 1e6:.0f} / {b['rss_bytes'] / 1e6:.0f} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plans", nargs="*", default=list(PLANS), help=f"any of {', '.join(PLANS)}")
    ap.add_argument("--astra-bin", required=True, help="ASTRA-sim's AstraSim_Analytical_Congestion_Unaware")
    ap.add_argument("--work", required=True, type=Path, help="folder for traces, configs and results.json")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per process")
    args = ap.parse_args()
    args.work = args.work.resolve()  # the command lines name absolute paths: ASTRA runs in each plan's folder
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.work / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for name in args.plans:
        t = time.perf_counter()
        results[name] = run_plan(name, args.work, os.path.abspath(args.astra_bin), args.timeout)
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{name}: done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    print(table({k: results[k] for k in PLANS if k in results}))


if __name__ == "__main__":
    main()
