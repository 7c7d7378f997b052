"""Derive the per-device kernel tables of ``tensorstage.sim.kernels`` from measured kernel latencies.

Source: the measured tables that the Apache-2.0 PyPI package ``aiconfigurator-core`` (NVIDIA) ships
under ``aiconfigurator_core/systems/data/<device>/<kernel>/<backend>/<version>/*.parquet``
(TensorRT-LLM ``torch_flow`` GEMMs and generation (decode) attention; context (prefill) attention
from the FlashAttention kernels training uses, see :data:`ATTN_FWD_SOURCE`).
Install the optional extra ``calibrate`` (``pip install -e .[calibrate]``: the package, pandas,
pyarrow), then::

    python scripts/calibrate_kernels.py            # finds the installed package
    python scripts/calibrate_kernels.py --data DIR  # or a folder holding systems/data

It writes ``src/tensorstage/hardware/kernels/<device preset>.json`` (efficiency surfaces with
provenance: package and version, source file, backend and version, dtype, sha256 of each parquet,
the command), ``tests/data/kernel_heldout.json`` (a sample of held-out measured points the tests
check the committed tables against) and prints the held-out MAPE per device, kernel and dtype.

Method (docs/calibration.md, "Measured kernel model"): every measured point goes to the fit set or
the held-out set by a hash of its shape (1 in 5 held out). Achieved efficiency = useful FLOPs (or
bytes, for decode attention) / (latency x reference peak). ``log(efficiency)`` is fitted by
least squares on a log2-spaced grid with multilinear interpolation (the same interpolation the
runtime uses) and a small curvature penalty that fills grid nodes without data. For GEMMs the fit
is tried with and without the 128x128 output-tile quantization factor and the variant with the
lower held-out error is kept. Output is deterministic (same inputs -> same bytes).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import sys
from dataclasses import asdict, astuple
from math import log, log2
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from tensorstage.hardware.presets import load_device  # noqa: E402
from tensorstage.sim.compute import ComputeModel, grouped_dims  # noqa: E402
from tensorstage.sim.kernels import KernelTables, tile_quantization  # noqa: E402
from tensorstage.sim.moe_layer import MoeLayer  # noqa: E402

#: device preset name -> aiconfigurator-core system folder
DEVICES = {"A100-80GB": "a100_sxm", "H100-SXM": "h100_sxm", "H200": "h200_sxm", "B200": "b200_sxm"}
BACKEND = "trtllm"
#: attention forward: the FlashAttention kernels training runs (Dao's FlashAttention-2 on A100 and
#: FlashAttention-3 on Hopper, as forked into vLLM); B200: TensorRT-LLM's FMHA (FlashAttention-3
#: does not run on Blackwell; vLLM's Blackwell prefill is the same TensorRT-LLM kernel via FlashInfer)
ATTN_FWD_SOURCE = {"A100-80GB": ("vllm", "vllm_flash_attn"), "H100-SXM": ("vllm", "vllm_flash_attn_fa3"),
                   "H200": ("vllm", "vllm_flash_attn_fa3"), "B200": ("trtllm", "torch_flow")}
#: aiconfigurator gemm_dtype -> our dtype (fp8 = per-tensor scaled FP8, as Transformer Engine's delayed scaling)
GEMM_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
HELDOUT_EVERY = 5  # 1 in 5 points held out
SAMPLE_PER_TABLE = 32  # held-out points per (device, kernel, dtype) committed for the tests
CURVATURE = 1e-2  # curvature penalty weight per grid node (relative to one data point)

GEMM_AXES = {
    "m": [2 ** i for i in range(0, 16)],
    "n": [2 ** i for i in range(5, 17)],
    "k": [2 ** i for i in range(5, 17)],
}
ATTN_AXES = {"bh": [4 ** i for i in range(0, 9)], "s": [2 ** i for i in range(4, 15)],
             "group": [4 ** i for i in range(0, 5)]}
#: MoE layers: TensorRT-LLM's CUTLASS fused MoE (``moe_torch_flow_cutlass``: gated SwiGLU, up and
#: gate projections as one GEMM of twice the expert width; ``moe_torch_flow_nongated``: one activation)
MOE_SOURCES = {"moe_torch_flow_cutlass": True, "moe_torch_flow_nongated": False}
#: aiconfigurator moe_dtype -> our dtype (fp8 = per-tensor scaled, as the GEMM table)
MOE_DTYPES = {"bfloat16": "bf16", "fp8": "fp8"}
MOE_AXES = {"tokens": [2 ** i for i in range(0, 15)], "width": [2 ** i for i in range(4, 16)]}
#: layers whose element-wise kernels (as modelled) take more than this share of the measured time say
#: too little about their GEMMs to enter the fit
MOE_ELEMENTWISE_MAX = 0.75
DEC_AXES = {"bkv": [4 ** i for i in range(0, 10)], "kv": [4 ** i for i in range(0, 10)],
            "group": [2 ** i for i in range(0, 8)]}


def heldout(key: str) -> bool:
    """Deterministic split: a point is held out when the first hash byte of its key is 0 mod 5."""
    return hashlib.sha256(key.encode()).digest()[0] % HELDOUT_EVERY == 0


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latest(folder: str, needs: str) -> str | None:
    """The newest version folder of ``folder`` (numeric-aware sort) that holds the file ``needs``."""
    import re

    vs = sorted((p for p in glob.glob(os.path.join(folder, "*")) if os.path.exists(os.path.join(p, needs))),
                key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", os.path.basename(p))])
    return vs[-1] if vs else None


def moe_folder(folder: str) -> str | None:
    """The newest version folder of ``folder`` whose MoE table holds the gated CUTLASS kernel (newer
    collections may hold only some kernels)."""
    import re

    vs = sorted(glob.glob(os.path.join(folder, "*", "moe_perf.parquet")),
                key=lambda p: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", os.path.basename(os.path.dirname(p)))])
    for path in reversed(vs):
        if "moe_torch_flow_cutlass" in set(read(path)["kernel_source"]):
            return os.path.dirname(path)
    return None


def multilinear(x: np.ndarray, axes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flat node indices (N x 2^D) and weights of each row of ``x`` (log2 coordinates, clamped)."""
    n, dims = x.shape
    los, ts = [], []
    for d in range(dims):
        ax = axes[d]
        xd = np.clip(x[:, d], ax[0], ax[-1])
        i = np.clip(np.searchsorted(ax, xd, side="right") - 1, 0, max(0, len(ax) - 2))
        t = (xd - ax[i]) / (ax[np.minimum(i + 1, len(ax) - 1)] - ax[i]) if len(ax) > 1 else np.zeros(n)
        los.append(i)
        ts.append(t)
    strides = np.cumprod([1] + [len(a) for a in axes[::-1]][:-1])[::-1]
    idx = np.zeros((n, 1 << dims), dtype=np.int64)
    w = np.ones((n, 1 << dims))
    for c in range(1 << dims):
        for d in range(dims):
            hi = (c >> d) & 1
            idx[:, c] += (los[d] + hi) * strides[d]
            w[:, c] *= ts[d] if hi else 1 - ts[d]
    return idx, w


def fit_surface(x: np.ndarray, y: np.ndarray, axes_vals: list[list[int]]) -> np.ndarray:
    """Least-squares node values of log efficiency ``y`` at log2 coordinates ``x`` (see module docstring)."""
    axes = [np.log2(np.array(a, dtype=float)) for a in axes_vals]
    shape = [len(a) for a in axes]
    nn = int(np.prod(shape))
    idx, w = multilinear(x, axes)
    ata = np.zeros((nn, nn))
    atb = np.zeros(nn)
    for a in range(idx.shape[1]):
        np.add.at(atb, idx[:, a], w[:, a] * y)
        for b in range(idx.shape[1]):
            np.add.at(ata, (idx[:, a], idx[:, b]), w[:, a] * w[:, b])
    grid = np.arange(nn).reshape(shape)
    lam = CURVATURE
    for d in range(len(shape)):
        if shape[d] < 3:
            continue
        a0 = np.take(grid, range(0, shape[d] - 2), axis=d).ravel()
        a1 = np.take(grid, range(1, shape[d] - 1), axis=d).ravel()
        a2 = np.take(grid, range(2, shape[d]), axis=d).ravel()
        for i, ci in ((a0, 1.0), (a1, -2.0), (a2, 1.0)):
            for j, cj in ((a0, 1.0), (a1, -2.0), (a2, 1.0)):
                np.add.at(ata, (i, j), lam * ci * cj)
    ata[np.diag_indices(nn)] += 1e-9
    return np.linalg.solve(ata, atb)


def sig(v: float, digits: int = 3) -> float:
    return float(f"{v:.{digits - 1}e}")


def surface_json(nodes: np.ndarray, axes_vals: list[list[int]], eff_max: float) -> dict:
    """Node efficiencies, capped at the highest measured efficiency (nodes far from any data extrapolate
    the curvature penalty's straight line, which must not promise more than was ever measured)."""
    eff = np.clip(np.exp(nodes), 1e-6, eff_max)
    return {"axes": axes_vals, "eff": [sig(v) for v in eff.tolist()]}


def mape(pred: np.ndarray, meas: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - meas) / meas) * 100.0)


# --- per-kernel fits -------------------------------------------------------------------------------

def gemm_fit(df, ref_flops: float) -> tuple[dict, dict]:
    """Fit one dtype's GEMM table; returns (table json, report)."""
    df = df.groupby(["m", "n", "k"], as_index=False)["latency"].median()
    m, n, k = (df[c].to_numpy(dtype=float) for c in ("m", "n", "k"))
    t = df["latency"].to_numpy() * 1e-3
    eff = 2 * m * n * k / (t * ref_flops)
    keys = [f"gemm|{int(a)}|{int(b)}|{int(c)}" for a, b, c in zip(m, n, k, strict=True)]
    hold = np.array([heldout(s) for s in keys])
    x = np.log2(np.stack([m, n, k], axis=1))
    axes = [GEMM_AXES["m"], GEMM_AXES["n"], GEMM_AXES["k"]]
    best = None
    for quant in ("none", "tile128"):
        q = np.array([tile_quantization(int(a), int(b)) for a, b in zip(m, n, strict=True)]) if quant == "tile128" \
            else np.ones_like(m)
        nodes = fit_surface(x[~hold], np.log(eff[~hold] / q[~hold]), axes)
        table = {**surface_json(nodes, axes, float((eff / q).max())), "quantization": quant, "ref_flops": ref_flops}
        score = mape(_predict_gemm(table, m[hold], n[hold], k[hold]), t[hold])
        if best is None or score < best[0] - 1e-9:
            best = (score, table, quant)
    score, table, quant = best
    pred = _predict_gemm(table, m, n, k)
    big = hold & (m >= 1024) & (n >= 1024) & (k >= 1024)  # the shapes of training GEMMs
    report = {"points": int(len(t)), "heldout_points": int(hold.sum()), "heldout_mape_pct": round(score, 2),
              "fit_mape_pct": round(mape(pred[~hold], t[~hold]), 2), "quantization": quant,
              "heldout_mape_pct_all_dims_ge_1024": round(mape(pred[big], t[big]), 2)}
    sample = [{"m": int(a), "n": int(b), "k": int(c), "time_s": float(f"{tt:.6e}")}
              for a, b, c, tt in zip(m[hold], n[hold], k[hold], t[hold], strict=True)]
    return table, {"report": report, "sample": _pick(sample)}


def _predict_gemm(table: dict, m, n, k) -> np.ndarray:
    kt = KernelTables({"device": "fit", "gemm": {"x": table}})
    return np.array([kt.gemm_s(1, int(a), int(b), int(c), "x") for a, b, c in zip(m, n, k, strict=True)])


def attn_fit(df, ref_flops: float) -> tuple[dict, dict]:
    """Causal context attention, per head dim: eff(b*h, s, h/kv_heads)."""
    tables, reports, samples = {}, {}, {}
    for hd, g in sorted(df.groupby("head_dim")):
        g = g.groupby(["batch_size", "isl", "num_heads", "num_key_value_heads"], as_index=False)["latency"].median()
        g = g[g.isl >= ATTN_AXES["s"][0]]
        b, s, h, kvh = (g[c].to_numpy(dtype=float) for c in ("batch_size", "isl", "num_heads", "num_key_value_heads"))
        t = g["latency"].to_numpy() * 1e-3
        eff = 4 * b * h * s * s * hd * 0.5 / (t * ref_flops)
        keys = [f"attn|{int(hd)}|{int(a)}|{int(c)}|{int(d)}|{int(e)}" for a, c, d, e in zip(b, s, h, kvh, strict=True)]
        hold = np.array([heldout(x) for x in keys])
        x = np.log2(np.stack([b * h, s, h / kvh], axis=1))
        axes = [ATTN_AXES["bh"], ATTN_AXES["s"], ATTN_AXES["group"]]
        nodes = fit_surface(x[~hold], np.log(eff[~hold]), axes)
        tables[str(int(hd))] = surface_json(nodes, axes, float(eff.max()))
        kt = KernelTables({"device": "fit", "attention_fwd": {"ref_flops": ref_flops, "head_dim": {str(int(hd)): tables[str(int(hd))]}}})
        pred = np.array([kt.attention_fwd_s(int(a), int(c), int(d), int(d), int(hd), kv_heads=int(e))
                         for a, c, d, e in zip(b, h, s, kvh, strict=True)])
        reports[str(int(hd))] = {"points": int(len(t)), "heldout_points": int(hold.sum()),
                                 "heldout_mape_pct": round(mape(pred[hold], t[hold]), 2),
                                 "fit_mape_pct": round(mape(pred[~hold], t[~hold]), 2)}
        samples[str(int(hd))] = _pick([{"batch": int(a), "heads": int(c), "kv_heads": int(e), "seq": int(d),
                                        "head_dim": int(hd), "time_s": float(f"{tt:.6e}")}
                                       for a, c, d, e, tt in zip(b[hold], h[hold], s[hold], kvh[hold], t[hold], strict=True)])
    return {"ref_flops": ref_flops, "causal": True, "head_dim": tables}, {"report": reports, "sample": samples}


def decode_fit(df, ref_Bps: float) -> tuple[dict, dict]:
    """Generation attention (one query per sequence), per head dim: HBM eff(b*kv_heads, kv_len, heads/kv_heads)."""
    tables, reports, samples = {}, {}, {}
    for hd, g in sorted(df.groupby("head_dim")):
        g = g.groupby(["batch_size", "step", "num_heads", "num_key_value_heads"], as_index=False)["latency"].median()
        b, kv, h, kvh = (g[c].to_numpy(dtype=float) for c in ("batch_size", "step", "num_heads", "num_key_value_heads"))
        kv = kv + 1  # the cache holds the step's own token too
        t = g["latency"].to_numpy() * 1e-3
        eff = 2 * b * kvh * kv * hd * 2 / (t * ref_Bps)
        keys = [f"dec|{int(hd)}|{int(a)}|{int(c)}|{int(d)}|{int(e)}" for a, c, d, e in zip(b, kv, h, kvh, strict=True)]
        hold = np.array([heldout(x) for x in keys])
        x = np.log2(np.stack([b * kvh, kv, h / kvh], axis=1))
        axes = [DEC_AXES["bkv"], DEC_AXES["kv"], DEC_AXES["group"]]
        nodes = fit_surface(x[~hold], np.log(eff[~hold]), axes)
        tables[str(int(hd))] = surface_json(nodes, axes, float(eff.max()))
        kt = KernelTables({"device": "fit", "decode_attention": {"ref_Bps": ref_Bps, "head_dim": {str(int(hd)): tables[str(int(hd))]}}})
        pred = np.array([kt.decode_attention_s(int(a), int(d), int(e), int(c), int(hd))
                         for a, d, e, c in zip(b, h, kvh, kv, strict=True)])
        reports[str(int(hd))] = {"points": int(len(t)), "heldout_points": int(hold.sum()),
                                 "heldout_mape_pct": round(mape(pred[hold], t[hold]), 2),
                                 "fit_mape_pct": round(mape(pred[~hold], t[~hold]), 2)}
        samples[str(int(hd))] = _pick([{"batch": int(a), "heads": int(d), "kv_heads": int(e), "kv_len": int(c),
                                        "head_dim": int(hd), "time_s": float(f"{tt:.6e}")}
                                       for a, d, e, c, tt in zip(b[hold], h[hold], kvh[hold], kv[hold], t[hold],
                                                                  strict=True)])
    return {"ref_Bps": ref_Bps, "head_dim": tables}, {"report": reports, "sample": samples}


def moe_fit(df, dev, gemm_tables: dict, dt: str) -> tuple[dict, dict] | None:
    """Grouped-GEMM efficiency relative to the dense table, from fused MoE layer latencies (module
    docstring of ``tensorstage.sim.kernels``); ``None`` if no point qualifies."""
    base = {"device": "fit", "gemm": gemm_tables}
    dense = ComputeModel.from_device(dev, dt, kernel_tables=KernelTables(base))  # unanchored, as measured
    wb = 1 if dt == "fp8" else 2
    pts, xs, ys, keys = [], [], [], []
    for r in df.itertuples():
        layer = MoeLayer(int(r.num_tokens), int(r.hidden_size), int(r.inter_size), int(r.topk), int(r.num_experts),
                         int(r.moe_tp_size), int(r.moe_ep_size), MOE_SOURCES[r.kernel_source])
        t = float(f"{r.latency * 1e-3:.6e}")
        if layer.inter // layer.tp < 1 or layer.local_experts < 1 or layer.routed_rows < layer.local_experts:
            continue  # fewer routed rows than local experts: idle experts, which the lowering does not model
        elem = layer.elementwise_s(dense)
        if elem > MOE_ELEMENTWISE_MAX * t:
            continue
        gemms = layer.gemms(wb)
        ratio = sum(dense.time_s(f, b, "matmul", g, "fwd") for f, b, g in gemms) / (t - elem)
        key = "moe|" + "|".join(str(v) for v in astuple(layer))
        me = layer.routed_rows / layer.local_experts
        for g in gemms:  # each GEMM looks its efficiency up at its own width
            xs.append((log2(me), log2(grouped_dims(g[2])[1])))
            ys.append(log(ratio))
            keys.append(key)
        pts.append((key, layer, t))
    if not pts:
        return None
    hold_of = {k: heldout(k) for k, _, _ in pts}
    hold = np.array([hold_of[k] for k in keys])
    x, y = np.array(xs), np.array(ys)
    axes = [MOE_AXES["tokens"], MOE_AXES["width"]]
    # the ratios scatter with what the layer model leaves out (a few layers run several times slower
    # than their neighbours): fit the median of each (tokens per expert, width) cell of the fit set,
    # so single outliers do not move the surface
    cells: dict[tuple[float, float], list[float]] = {}
    for (a, b), v in zip(x[~hold], y[~hold], strict=True):
        cells.setdefault((round(a * 2) / 2, round(b)), []).append(v)
    cx = np.array(sorted(cells))
    cy = np.array([float(np.median(cells[c])) for c in sorted(cells)])
    nodes = fit_surface(cx, cy, axes)
    table = surface_json(nodes, axes, float(np.exp(cy).max()))
    fitted = ComputeModel.from_device(dev, dt, kernel_tables=KernelTables({**base, "moe_gemm": {dt: table}}))
    meas = np.array([t for _, _, t in pts])
    with_eff = np.array([layer.time_s(fitted) for _, layer, _ in pts])
    without = np.array([layer.time_s(dense, grouped=False) for _, layer, _ in pts])
    h = np.array([hold_of[k] for k, _, _ in pts])
    report = {"points": int(len(pts)), "heldout_points": int(h.sum()),
              "heldout_mape_pct": round(mape(with_eff[h], meas[h]), 2),
              "fit_mape_pct": round(mape(with_eff[~h], meas[~h]), 2),
              "heldout_mape_pct_dense_table_only": round(mape(without[h], meas[h]), 2)}
    sample = [{**asdict(layer), "time_s": t} for key, layer, t in pts if hold_of[key]]
    return table, {"report": report, "sample": _pick(sample)}


def _pick(rows: list[dict]) -> list[dict]:
    """A deterministic random sample of ``SAMPLE_PER_TABLE`` held-out rows (first by a hash of the row)."""
    keyed = sorted(rows, key=lambda r: hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest())
    return sorted(keyed[:SAMPLE_PER_TABLE], key=lambda r: json.dumps(r, sort_keys=True))


# --- cross-check against other software stacks ------------------------------------------------------

def crosscheck(data: str, base: str, out: dict) -> dict:
    """MAPE of the fitted GEMM tables against the same package's measurements with other serving stacks
    (vLLM, SGLang: different GEMM libraries on the same GPU model), none of which entered the fit."""
    kt = KernelTables({"device": "fit", "gemm": out["gemm"]})
    res: dict = {}
    for backend in ("vllm", "sglang"):
        vdir = latest(os.path.join(base, "gemm", backend), "gemm_perf.parquet")
        if not vdir:
            continue
        path = os.path.join(vdir, "gemm_perf.parquet")
        df = read(path)
        for src_dt, dt in GEMM_DTYPES.items():
            g = df[df.gemm_dtype == src_dt].groupby(["m", "n", "k"], as_index=False)["latency"].median()
            if g.empty or dt not in out["gemm"]:
                continue
            m, n, k = (g[c].to_numpy() for c in ("m", "n", "k"))
            t = g["latency"].to_numpy() * 1e-3
            pred = np.array([kt.gemm_s(1, int(a), int(b), int(c), dt) for a, b, c in zip(m, n, k, strict=True)])
            big = (m >= 1024) & (n >= 1024) & (k >= 1024)
            res[f"gemm/{dt}/{backend}-{os.path.basename(vdir)}"] = {
                "points": int(len(t)), "mape_pct": round(mape(pred, t), 2),
                "mape_pct_all_dims_ge_1024": round(mape(pred[big], t[big]), 2),
                "file": source(data, path, os.path.basename(vdir), src_dt)["file"]}
    return res


# --- driver ----------------------------------------------------------------------------------------

def find_data(arg: str | None) -> tuple[str, str, str]:
    """(systems/data folder, package name, package version)."""
    if arg:
        data = arg if os.path.basename(arg.rstrip("/")) == "data" else os.path.join(arg, "systems", "data")
        root = Path(data).resolve().parent.parent
        dist = sorted(glob.glob(str(root.parent / "aiconfigurator_core-*.dist-info")))
        version = os.path.basename(dist[-1]).removesuffix(".dist-info").split("-")[1] if dist else "unknown"
        return data, "aiconfigurator-core", version
    from importlib import metadata, util

    spec = util.find_spec("aiconfigurator_core")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("calibrate_kernels: aiconfigurator-core is not installed (pip install -e .[calibrate]) "
                         "and no --data folder was given")
    root = list(spec.submodule_search_locations)[0]
    return os.path.join(root, "systems", "data"), "aiconfigurator-core", metadata.version("aiconfigurator-core")


def read(path: str):
    import pandas as pd

    return pd.read_parquet(path)


def plain_bf16(df):
    """BF16 attention with a BF16 KV cache, no sliding window, no beam search (columns a table lacks: all)."""
    keep = (df.attn_dtype == "bfloat16") & (df.kv_cache_dtype == "bfloat16")
    if "window_size" in df:
        keep &= df.window_size == 0
    if "beam_width" in df:
        keep &= df.beam_width == 1
    return df[keep]


def source(data: str, path: str, backend_version: str, dtype: str, backend: str = BACKEND) -> dict:
    return {"file": "aiconfigurator_core/systems/data/" + os.path.relpath(path, data).replace(os.sep, "/"),
            "backend": backend, "backend_version": backend_version, "dtype": dtype, "sha256": sha256_file(path)}


def calibrate(data: str, package: str, version: str, out_dir: Path, heldout_path: Path) -> dict:
    summary: dict = {}
    heldout_all: dict = {"split": f"sha256(shape key)[0] % {HELDOUT_EVERY} == 0", "devices": {}}
    for preset, folder in DEVICES.items():
        dev = load_device(preset)
        base = os.path.join(data, folder)
        if not os.path.isdir(base):
            continue
        out: dict = {"device": preset, "schema": 1,
                     "provenance": {"package": package, "package_version": version, "license": "Apache-2.0",
                                    "measured_device": None, "sources": [],
                                    "command": "python scripts/calibrate_kernels.py"}}
        rep: dict = {}
        held: dict = {}
        gdir = latest(os.path.join(base, "gemm", BACKEND), "gemm_perf.parquet")
        if gdir:
            path = os.path.join(gdir, "gemm_perf.parquet")
            df = read(path)
            out["provenance"]["measured_device"] = str(df["device"].iloc[0])
            out["gemm"] = {}
            for src_dt, dt in GEMM_DTYPES.items():
                g = df[(df.gemm_dtype == src_dt) & (df.kernel_source == "torch_flow")]
                if g.empty or dev.peak_flops(dt) is None:
                    continue
                table, r = gemm_fit(g, dev.peak_flops(dt))
                out["gemm"][dt] = table
                rep[f"gemm/{dt}"] = r["report"]
                held[f"gemm/{dt}"] = r["sample"]
                out["provenance"]["sources"].append(
                    {**source(data, path, os.path.basename(gdir), src_dt), "kernel": "gemm"})
        mdir = moe_folder(os.path.join(base, "moe", BACKEND))
        if mdir and "gemm" in out:
            path = os.path.join(mdir, "moe_perf.parquet")
            df = read(path)
            df = df[df.kernel_source.isin(list(MOE_SOURCES)) & (df.distribution == "balanced")]
            for src_dt, dt in MOE_DTYPES.items():
                got = moe_fit(df[df.moe_dtype == src_dt], dev, out["gemm"], dt) if dt in out["gemm"] else None
                if got is None:
                    continue
                out.setdefault("moe_gemm", {})[dt] = got[0]
                rep[f"moe_layer/{dt}"] = got[1]["report"]
                held[f"moe_layer/{dt}"] = got[1]["sample"]
                out["provenance"]["sources"].append(
                    {**source(data, path, os.path.basename(mdir), src_dt), "kernel": "moe_layer",
                     "kernel_source": ",".join(MOE_SOURCES), "distribution": "balanced"})
        fa_backend, fa_kernel = ATTN_FWD_SOURCE[preset]
        fdir = latest(os.path.join(base, "attention", fa_backend), "context_attention_perf.parquet")
        if fdir:
            path = os.path.join(fdir, "context_attention_perf.parquet")
            df = read(path)
            df = plain_bf16(df)
            df = df[df.kernel_source == fa_kernel]
            table, r = attn_fit(df, dev.peak_flops("bf16"))
            out["attention_fwd"] = {**table, "kernel_source": fa_kernel}
            for hd, v in r["report"].items():
                rep[f"attention_fwd/bf16/hd{hd}"] = v
                held[f"attention_fwd/bf16/hd{hd}"] = r["sample"][hd]
            out["provenance"]["sources"].append(
                {**source(data, path, os.path.basename(fdir), "bfloat16", fa_backend), "kernel": "attention_fwd",
                 "kernel_source": fa_kernel})
        adir = latest(os.path.join(base, "attention", BACKEND), "generation_attention_perf.parquet")
        if adir:
            path = os.path.join(adir, "generation_attention_perf.parquet")
            df = read(path)
            df = plain_bf16(df)
            table, r = decode_fit(df, dev.hbm_GBps * 1e9)
            out["decode_attention"] = table
            for hd, v in r["report"].items():
                rep[f"decode_attention/bf16/hd{hd}"] = v
                held[f"decode_attention/bf16/hd{hd}"] = r["sample"][hd]
            out["provenance"]["sources"].append(
                {**source(data, path, os.path.basename(adir), "bfloat16"), "kernel": "decode_attention"})
        out["heldout_mape_pct"] = {k: v["heldout_mape_pct"] for k, v in rep.items()}
        if "gemm" in out:
            out["crosscheck"] = crosscheck(data, base, out)
            rep.update({f"crosscheck/{k}": v for k, v in out["crosscheck"].items()})
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{preset}.json").write_text(json.dumps(out, sort_keys=True, separators=(",", ":")) + "\n")
        summary[preset] = rep
        heldout_all["devices"][preset] = held
    heldout_path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"split": heldout_all["split"]})[:-1] + ', "devices": {']
    devs = heldout_all["devices"]
    for i, dev in enumerate(sorted(devs)):
        lines.append(f" {json.dumps(dev)}: {{")
        for j, kern in enumerate(sorted(devs[dev])):
            lines.append(f"  {json.dumps(kern)}: [")
            pts = devs[dev][kern]
            lines += ["   " + json.dumps(p, sort_keys=True, separators=(",", ":")) + ("," if q < len(pts) - 1 else "")
                      for q, p in enumerate(pts)]
            lines.append("  ]" + ("," if j < len(devs[dev]) - 1 else ""))
        lines.append(" }" + ("," if i < len(devs) - 1 else ""))
    lines.append("}}")
    heldout_path.write_text("\n".join(lines) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="aiconfigurator_core package folder (or its systems/data)")
    ap.add_argument("--out", default=str(REPO / "src" / "tensorstage" / "hardware" / "kernels"))
    ap.add_argument("--heldout", default=str(REPO / "tests" / "data" / "kernel_heldout.json"))
    args = ap.parse_args()
    data, package, version = find_data(args.data)
    summary = calibrate(data, package, version, Path(args.out), Path(args.heldout))
    print(f"{'device':<10} {'kernel':<28} {'points':>7} {'held':>6} {'fit %':>7} {'held-out %':>10}")
    for dev, rep in summary.items():
        for kern, r in rep.items():
            if kern.startswith("crosscheck/"):
                continue
            extra = (f"  (quantization {r['quantization']}; m,n,k >= 1024: "
                     f"{r['heldout_mape_pct_all_dims_ge_1024']:.2f} %)") if "quantization" in r else ""
            print(f"{dev:<10} {kern:<28} {r['points']:>7} {r['heldout_points']:>6} {r['fit_mape_pct']:>7.2f} "
                  f"{r['heldout_mape_pct']:>10.2f}{extra}")
    print("\ncross-check: the fitted GEMM tables against other stacks' measurements (not fitted)")
    for dev, rep in summary.items():
        for kern, r in rep.items():
            if kern.startswith("crosscheck/"):
                print(f"{dev:<10} {kern[11:]:<34} {r['points']:>7} MAPE {r['mape_pct']:>6.2f} %  "
                      f"(m,n,k >= 1024: {r['mape_pct_all_dims_ge_1024']:.2f} %)")


if __name__ == "__main__":
    main()
