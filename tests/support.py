"""Helpers several test modules share: the shared reference data, a Megatron-style GPT spec and an
in-process CLI call. Imported as ``tests.support`` (pytest puts the repository root on the path)."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tensorstage.model import ModelSpec

#: The repository root (this file is ``tests/support.py``).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The project's shared reference data sits beside the repository: ``../shared``.
SHARED_DIR = REPO_ROOT.parent / "shared"
#: The published cases and closed forms the tests check against.
PUBLIC_CASES = "validation/public_cases.yaml"


def shared_file(relative: str) -> Path:
    """``../shared/<relative>`` beside the repository; the one way tests find the shared data.

    Raises :class:`FileNotFoundError` naming the path when it is absent: the tests that read it are
    checks against independent data and must fail, never skip, without it.
    """
    path = SHARED_DIR / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the tests read the shared reference data beside the repository "
            f"(../shared/{relative}); check it out there"
        )
    return path


@lru_cache(maxsize=1)
def _public_cases_text() -> str:
    return shared_file(PUBLIC_CASES).read_text()


def public_cases() -> dict:
    """``../shared/validation/public_cases.yaml`` parsed (a fresh copy each call; the text is read once)."""
    return yaml.safe_load(_public_cases_text())


_NUMBER = re.compile(r"(\d[\d,]*(?:\.\d+)?)\s*([A-Za-z/]+)?")


def stated_numbers(text: str, unit_scales: dict[str, float]) -> set[float]:
    """Every number a source text states, as written and (when followed by a unit in
    ``unit_scales``) converted to the field's unit; plus each divided by any ``/ N`` the text
    applies (``383 TFLOPS per package / 2 GCDs`` -> 383 and 191.5). Used to check that a preset's
    number is the one its cited source gives."""
    found: set[float] = set()
    for number, unit in _NUMBER.findall(text):
        value = float(number.replace(",", ""))
        found.add(value)
        if unit in unit_scales:
            found.add(value * unit_scales[unit])
    divisors = [int(d) for d in re.findall(r"/\s*(\d+)\b", text)]
    return found | {v / d for v in found for d in divisors if d}


def states(text: str, value: float, unit_scales: dict[str, float]) -> bool:
    """Whether ``text`` states ``value`` (relative 1e-3: sources round, e.g. 3.2768 TB/s / 2)."""
    return any(abs(x - value) <= 1e-3 * abs(value) for x in stated_numbers(text, unit_scales))


def megatron_gpt(L: int = 2, h: int = 256, a: int = 8, V: int = 1024, s: int = 128) -> ModelSpec:
    """GPT as in Narayanan/Korthikanti: 4h GeLU MLP, LayerNorm, learned positions, tied embeddings,
    biases everywhere (the configuration their closed forms assume)."""
    return ModelSpec(
        name="gpt",
        num_layers=L,
        hidden=h,
        num_heads=a,
        ffn=4 * h,
        vocab=V,
        max_seq=s,
        activation="gelu",
        norm="layernorm",
        positions="learned",
        tied_embeddings=True,
        qkv_bias=True,
        out_bias=True,
        mlp_bias=True,
    )


@dataclass
class Result:
    """What a CLI call returned."""

    returncode: int
    stdout: str
    stderr: str


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """``tensorstage.cli.main`` in-process with patched argv (fast; same error handling as the script)."""
    from tensorstage.cli import main

    monkeypatch.setattr(sys, "argv", ["tensorstage", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return Result(code, out.out, out.err)
