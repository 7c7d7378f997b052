"""Slices of a torus scale-up network: the ring sizes of a smaller job on a TPU-style 3-D torus.

Why: a TPU pod's ICI is one 3-D torus (ASTRA-sim: one ``Ring`` dimension per torus axis), and a
job runs on a slice of it, e.g. 4x4x8 of a 16x16x16 TPU v4 pod. Resizing such a system to a job's
chip count must pick the slice's ring sizes. The rule here is the one Google's slice shapes follow
(Cloud TPU v4 docs: torus slices AxBxC with each side a multiple of 4 and 2A=B=C or 2A=2B=C, e.g.
4x4x8, 4x8x8, 12x12x24; PaLM's 3072-chip v4 slices were 12x16x16): the most balanced shape, i.e.
the smallest largest ring, then the smallest sum of ring sizes, larger rings on the outer axes.

Not modelled: slices smaller than one 4x4x4 cube are 3-D meshes on real TPUs (no wrap-around
links; Cloud TPU v5p docs: "All 4x4x4 and larger slices have full 3D torus"); here every axis
stays a ring, which is optimistic by up to 2x on the ring bandwidth of those small slices.
"""

from __future__ import annotations

from itertools import product


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def torus_slice(caps: tuple[int, ...], chips: int) -> tuple[int, ...] | None:
    """Ring sizes (innermost axis first) of the most balanced ``chips``-chip slice with each ring at
    most ``caps[i]``, or ``None`` if no such slice exists (e.g. a prime larger than every cap)."""
    if chips < 1:
        return None
    best: tuple[tuple[int, int, tuple[int, ...]], tuple[int, ...]] | None = None
    for shape in product(*(_divisors(chips, c) for c in caps)):
        prod = 1
        for s in shape:
            prod *= s
        if prod != chips:
            continue
        # balanced first; among equals prefer larger rings outermost (reversed shape, descending)
        key = (max(shape), sum(shape), tuple(-s for s in reversed(shape)))
        if best is None or key < best[0]:
            best = (key, shape)
    return None if best is None else best[1]
