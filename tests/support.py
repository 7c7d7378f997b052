"""Helpers several test modules share: a Megatron-style GPT spec and an in-process CLI call."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from tensorstage.model import ModelSpec


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
