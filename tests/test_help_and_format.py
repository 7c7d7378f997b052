"""Feedback a user reads: --help shows every choice and the default plan's values at 80 columns,
numbers are formatted one way, and validate reports its progress."""

from __future__ import annotations

import pytest

from tensorstage import api
from tensorstage.report.console import _fmt
from tests.support import run_main


@pytest.mark.parametrize("command", ["simulate", "generate", "run"])
def test_help_shows_choices_and_defaults_at_80_columns(command: str, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    res = run_main(monkeypatch, capsys, command, "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.replace("│", " ").split())
    assert "…" not in res.stdout  # nothing cut
    for choice in ("gpipe, 1f1b, interleaved, zb-h1", "none, selective, full", "bf16, fp16, fp8, fp32"):
        assert choice in text, choice
    p = api.DEFAULT_PLAN
    for value in (f"Default plan: {p.schedule}.", f"Default plan: {p.seq}.", f"Default plan: {p.recompute}."):
        assert value in text, value


def test_one_number_format() -> None:
    assert _fmt(123528.4) == "123,528"  # tokens/s: never 1.235e+05
    assert _fmt(7325.0) == "7,325"
    assert _fmt(0.5305) == "0.5305"
    assert _fmt(0.0009714) == "0.0009714"
    assert _fmt(12) == "12" and _fmt(16384) == "16,384"
    assert "e+" in _fmt(3.0e20)  # beyond a readable width: scientific


def test_validate_reports_progress() -> None:
    calls: list[tuple[int, int, str]] = []
    v = api.validate(only=r"^TRAIN-NARAYANAN21-T1-1\.7B$", progress=lambda i, n, t: calls.append((i, n, t.id)))
    assert calls == [(1, 1, "TRAIN-NARAYANAN21-T1-1.7B")]
    assert not v.failed and len(v.results) == 1


def test_the_spinner_stays_off_when_stderr_is_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from tensorstage.report.console import status

    with status("simulating ..."):
        pass
    assert capsys.readouterr() == ("", "")  # piped runs: nothing but the result
