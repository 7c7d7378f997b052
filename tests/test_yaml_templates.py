"""`show NAME --yaml` and `systems NAME --yaml` print starting templates that load back unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from tensorstage import api
from tests.support import run_main


@pytest.mark.parametrize("name", ["llama3.1-8b", "mixtral-8x7b", "deepseek-v3"])
def test_model_template_round_trips(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(monkeypatch, capsys, "show", name, "--yaml")
    assert res.returncode == 0, res.stderr
    f = tmp_path / "model.yaml"
    f.write_text(res.stdout)
    assert api.load_model(str(f)) == api.load_model(name)


@pytest.mark.parametrize("name", ["dgx-h100-superpod", "mi300x-node"])
def test_system_template_round_trips(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(monkeypatch, capsys, "systems", name, "--yaml", "--num-gpus", "16")
    assert res.returncode == 0, res.stderr
    f = tmp_path / "system.yaml"
    f.write_text(res.stdout)
    assert api.load_system(f).to_dict() == api.load_system(name, 16).to_dict()


def test_system_template_needs_a_name(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    res = run_main(monkeypatch, capsys, "systems", "--yaml")
    assert res.returncode == 2 and res.stderr.startswith("error: system:") and res.stderr.count("\n") == 1
