"""Measure the two device efficiencies the presets use: large-GEMM and HBM copy fractions of peak.

Usage (on a machine with an NVIDIA GPU and a CUDA build of PyTorch)::

    python bench/bench_kernels.py                 # device preset guessed from the GPU name
    python bench/bench_kernels.py --device H200   # compare against this preset's peaks
    python bench/bench_kernels.py --repeats 50

What it times, with CUDA events after warm-up (median of ``--repeats`` runs):

* ``torch.matmul`` of two 8192 x 8192 bf16 matrices filled with random normal values
  (2 * 8192**3 FLOPs; random data, since an all-zero matrix lets the hardware clock and power
  behave differently) -> TFLOP/s and its fraction of the preset's dense bf16 peak
  (``matmul_efficiency`` in ``src/tensorstage/hardware/presets.yaml``);
* a device-to-device ``Tensor.copy_`` of 2 GiB, counting bytes read + written -> TB/s and its
  fraction of the preset's HBM bandwidth (``hbm_efficiency``).

It prints one table with the device name, the date, the measured numbers and the preset fractions.
The H100 and H200 presets' efficiencies come from this script (see their ``sources``). Without a
CUDA device it says so and exits with status 0, so it can sit in any checkout.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

N = 8192
COPY_BYTES = 2 * 2**30


def _time_ms(fn, repeats: int) -> float:  # noqa: ANN001 - a zero-argument callable
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _preset_for(name: str, given: str | None) -> object | None:
    from tensorstage.errors import SpecError
    from tensorstage.hardware import load_device

    guess = given or ("H200" if "H200" in name else "H100-SXM" if "H100" in name else
                      "A100-80GB" if "A100" in name else "B200" if "B200" in name else None)
    if guess is None:
        return None
    try:
        return load_device(guess)
    except SpecError:
        return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", help="device preset to compare with (default: from the GPU name)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: nothing to measure")
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run this on the GPU whose preset you want to check)")
        return 0
    name = torch.cuda.get_device_name(0)
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(N, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    b = torch.randn(N, N, device="cuda", dtype=torch.bfloat16, generator=gen)
    ms = _time_ms(lambda: torch.matmul(a, b), args.repeats)
    tflops = 2 * N**3 / (ms * 1e-3) / 1e12
    src = torch.empty(COPY_BYTES // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms_copy = _time_ms(lambda: dst.copy_(src), args.repeats)
    tbps = 2 * COPY_BYTES / (ms_copy * 1e-3) / 1e12  # bytes read + bytes written
    preset = _preset_for(name, args.device)
    rows = [("device", name), ("date (UTC)", datetime.datetime.now(datetime.UTC).date().isoformat()),
            ("torch", torch.__version__), (f"bf16 matmul {N}^3", f"{tflops:,.1f} TFLOP/s ({ms:.3f} ms)"),
            ("device copy 2 GiB (read + write)", f"{tbps:,.2f} TB/s ({ms_copy:.3f} ms)")]
    if preset is not None:
        peak_tflops = preset.bf16_flops / 1e12  # type: ignore[attr-defined]
        peak_tbps = preset.hbm_GBps / 1e3  # type: ignore[attr-defined]
        rows += [(f"preset {preset.name}: bf16 peak", f"{peak_tflops:,.0f} TFLOP/s"),  # type: ignore[attr-defined]
                 ("matmul fraction of peak", f"{tflops / peak_tflops:.3f} "
                  f"(preset matmul_efficiency {preset.matmul_efficiency})"),  # type: ignore[attr-defined]
                 (f"preset {preset.name}: HBM", f"{peak_tbps:,.2f} TB/s"),  # type: ignore[attr-defined]
                 ("copy fraction of peak", f"{tbps / peak_tbps:.3f} "
                  f"(preset hbm_efficiency {preset.hbm_efficiency})")]  # type: ignore[attr-defined]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
