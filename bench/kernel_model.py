"""Measured kernel model against the roofline on typical training kernels, per device and dtype.

Prints, for GEMMs of transformer layers (Llama-3-70B at TP 8, a small h = 2048 model at TP 1, an MoE
expert group) and causal flash attention (forward and backward, 4K to 128K context), the time the
measured tables charge (``sim/kernels.py``), the roofline's, and the achieved TFLOP/s of each. A
reading aid for docs/calibration.md ("Measured kernel model"); nothing here is asserted.
Run: ``.venv/bin/python bench/kernel_model.py``.
"""

from __future__ import annotations

from tensorstage.hardware import load_device
from tensorstage.report.console import print_table
from tensorstage.sim.compute import ComputeModel

TOKENS = 8192  # tokens per micro-batch on a rank (e.g. 1 x 8192 or 2 x 4096)
GEMMS = {
    "70B qkv (TP8)": (1, TOKENS, (64 + 2 * 8) * 128 // 8, 8192),
    "70B fc1 gate+up (TP8)": (1, TOKENS, 2 * 28672 // 8, 8192),
    "70B fc2 (TP8)": (1, TOKENS, 8192, 28672 // 8),
    "h2048 fc1 (TP1)": (1, TOKENS, 4 * 2048, 2048),
    "h2048 wgrad fc1": (1, 2048, 4 * 2048, TOKENS),
    "MoE 8 experts x 1024 tok, 7168 x 2048": (8, 1024, 2 * 2048, 7168),
}
ATTENTION = {  # (batch * heads, seq, head dim) for causal self-attention, one rank
    "70B 8K (TP8)": (8, 8192, 128),
    "70B 32K CP4 chunk": (8, 8192, 128),
    "405B 128K (TP8, CP16)": (16, 8192, 128),
    "8B 4K x 4 seqs": (4 * 32, 4096, 128),
}


def main() -> None:
    for device, dtypes in (("A100-80GB", ("bf16",)), ("H100-SXM", ("bf16", "fp8")), ("H200", ("bf16",)),
                           ("B200", ("bf16", "fp8"))):
        dev = load_device(device)
        for dtype in dtypes:
            on = ComputeModel.from_device(dev, dtype, kernel_tables=True)
            off = ComputeModel.from_device(dev, dtype, kernel_tables=False)
            rows = []
            for name, g in GEMMS.items():
                b, m, n, k = g
                f = 2 * b * m * n * k
                nbytes = 2 * b * (m * k + k * n + m * n)
                t_on, t_off = on.time_s(f, nbytes, "matmul", g), off.time_s(f, nbytes, "matmul", g)
                rows.append([name, t_on * 1e6, t_off * 1e6, f / t_on / 1e12, f / t_off / 1e12])
            for name, (bh, s, d) in ATTENTION.items():
                g = (bh, s, s, d)
                for cat, per_pair in (("fwd", 4 * d + 5), ("bwd_input", 10 * d + 10)):
                    f = bh * s * s * per_pair * 0.5
                    t_on = on.time_s(f, 0, "attention", g, cat)
                    t_off = off.time_s(f, 0, "attention", g, cat)
                    useful = f * (4 * d if cat == "fwd" else 10 * d) / per_pair
                    rows.append([f"attn {name} {cat}", t_on * 1e6, t_off * 1e6, useful / t_on / 1e12,
                                 useful / t_off / 1e12])
            print_table(f"{device} {dtype}: measured kernels vs roofline",
                        ["kernel", "tables us", "roofline us", "tables TFLOP/s", "roofline TFLOP/s"], rows)


if __name__ == "__main__":
    main()
