"""``best-plan`` against published layouts: how close does the published (TP, PP) come to our optimum?

Usage::

    .venv/bin/python bench/bench_best_plan.py                    # all cases below
    .venv/bin/python bench/bench_best_plan.py --cases 1.7B 18.4B --top 4
    # Table 1 in the feature space of the 2021 Megatron-LM (the plan conventions `validate` uses):
    .venv/bin/python bench/bench_best_plan.py --even-splits --fix zero=0 recompute=full \
        attention_impl=materialized attention_flops=full dropout=true megatron_fusions=true sp=false \
        overlap_grad_reduce=false

Cases: every Narayanan et al. 2021 Table 1 row of ``../shared/validation/public_cases.yaml``
(model preset ``megatron-<size>``, GPU count, global batch, sequence 2048, fp16, Selene DGX A100);
Llama 3 405B on 16,384 H100 (Llama 3 paper, Table 4: TP 8, CP 1, PP 16, DP 128, sequence 8,192,
global batch 2,048 sequences = 16 M tokens); Turing-NLG 530B on 5,128 A100 as in Calculon
(Isaev et al. SC23, whose optimum is TP 8, PP 1, DP 641 with host offload at 17.3 s/step; its
batch is not restated here, so 2,564 = 4 x 641 sequences is used, the multiple of the DP degree
nearest 2,560; 530B is the 529.6B preset, the same 105 x 20,480 shape).

For each: ``best_plan`` over the whole layout space (top ``--top`` screened layouts simulated),
then ``best_plan`` with the published TP and PP pinned (every other knob still searched) and
the gap of the published layout's best simulated step time to the optimum (acceptance: <= 5 %).
Wall seconds are per call, on however many cores the machine lends.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.explore.bestplan import best_plan, layout_of
from tensorstage.report.console import print_table
from tensorstage.validation.cases import default_cases_path, read_cases


def cases() -> list[dict[str, Any]]:
    out = []
    for c in read_cases(default_cases_path()):
        if not c["id"].startswith("TRAIN-NARAYANAN21-T1-"):
            continue
        size = c["id"].rsplit("-", 1)[1]
        preset = "megatron-1t" if size == "1008.0B" else f"megatron-{size.lower()}"
        p = c["parallel"]
        out.append({"name": size, "model": preset, "system": "dgx-a100-selene", "gpus": c["hardware"]["num_gpus"],
                    "global_batch": p["global_batch"], "seq": 2048, "dtype": "fp16", "tp": p["tp"], "pp": p["pp"]})
    out.append({"name": "llama3-405B", "model": "llama3.1-405b", "system": "dgx-h100-superpod", "gpus": 16384,
                "global_batch": 2048, "seq": 8192, "dtype": "bf16", "tp": 8, "pp": 16})
    out.append({"name": "turing-530B", "model": "megatron-529.6b", "system": "dgx-a100-selene", "gpus": 5128,
                "global_batch": 2564, "seq": 2048, "dtype": "fp16", "tp": 8, "pp": 1})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", help="case names (e.g. 1.7B llama3-405B); default all")
    ap.add_argument("--top", type=int, default=4)
    ap.add_argument("--fix", nargs="*", default=[], metavar="KEY=VALUE",
                    help="plan keys pinned in both searches, e.g. zero=0 recompute=full (the features of "
                         "Megatron-LM in 2021: no ZeRO, full recompute as Table 1 states)")
    ap.add_argument("--even-splits", action="store_true",
                    help="only layer counts that pp * vpp divides (Megatron-LM 2021 had no uneven stages)")
    args = ap.parse_args()
    pins = {}
    for item in args.fix:
        k, _, v = item.partition("=")
        pins[k] = int(v) if v.lstrip("-").isdigit() else v
    rows = []
    for c in cases():
        if args.cases and c["name"] not in args.cases:
            continue
        kw = dict(dtype=c["dtype"], top=args.top, uneven=not args.even_splits)
        t0 = time.perf_counter()
        opt = best_plan(c["model"], c["system"], c["gpus"], c["global_batch"], c["seq"], fixed=pins or None, **kw)
        t_opt = time.perf_counter() - t0
        try:  # the published layout may not be legal in the pinned space (e.g. even splits of 126 layers)
            pub = best_plan(c["model"], c["system"], c["gpus"], c["global_batch"], c["seq"],
                            fixed={**pins, "tp": c["tp"], "pp": c["pp"]}, **kw)
        except SpecError as exc:
            print(f"{c['name']}: published layout not searchable here: {exc}", flush=True)
            pub = None
        b, p = opt.best, None if pub is None else pub.best
        row = {"case": c["name"], "gpus": c["gpus"], "published": f"TP{c['tp']} PP{c['pp']}"}
        if b is not None:
            tp, pp, dp = layout_of(b.plan)
            row.update(ours=f"TP{tp} PP{pp} DP{dp} v{b.plan.get('vpp', 1)} mb{b.plan.get('micro_batch', 1)} "
                            f"{b.plan.get('recompute')} z{b.plan.get('zero', 0)}",
                       ours_step_s=round(b.full["step_time_s"], 3))  # type: ignore[index]
        if p is not None:
            row.update(published_step_s=round(p.full["step_time_s"], 3))  # type: ignore[index]
        if b is not None and p is not None:
            gap = p.full["step_time_s"] / b.full["step_time_s"] - 1  # type: ignore[index]
            row.update(gap_pct=round(100 * gap, 1), within_5pct="yes" if gap <= 0.05 else "no")
        row.update(layouts=opt.legal, screen_s=round(opt.screened_s, 2), best_plan_wall_s=round(t_opt, 1))
        rows.append(row)
        print(row, flush=True)
    cols = ["case", "gpus", "published", "ours", "ours_step_s", "published_step_s", "gap_pct", "within_5pct",
            "layouts", "screen_s", "best_plan_wall_s"]
    print_table("best-plan vs published layouts", cols, [[r.get(k, "") for k in cols] for r in rows])


if __name__ == "__main__":
    main()
