"""Ctrl-C in a long `generate`: one line at once, partial output removed within seconds, a second
Ctrl-C exits without a traceback, and temp folders of dead processes are removed by the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorstage.fileio import atomic_dir, remove_stale_temps
from tensorstage.interrupts import CANCEL_MESSAGE, cancel_on_interrupt

ROOT = Path(__file__).resolve().parents[1]
#: 16,384 ranks of a small model: thousands of files, so the write is still running when interrupted.
BIG = ["generate", "gpt3-125m", "--tp", "1", "--pp", "1", "--dp", "16384", "--seq", "128", "--global-batch", "16384",
       "--zero", "0", "--recompute", "none", "--no-json-traces", "--workers", "2"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_first_interrupt_prints_and_unwinds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyboardInterrupt), cancel_on_interrupt():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # interrupted long before this ends
    assert capsys.readouterr().err == CANCEL_MESSAGE + "\n"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_stale_temps_of_dead_processes_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "g"
    dead, alive = _dead_pid(), os.getppid()  # our parent: alive, and not this process's own temp name
    for name in (f".g.tmp-{dead}", f".g.old-{dead}", f".g.tmp-{alive}", f".other.tmp-{dead}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trace.0.et").write_bytes(b"x" * 100)
    with atomic_dir(out) as tmp:
        (tmp / "manifest.json").write_text('{"tool": "tensorstage"}')
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".g.tmp-{alive}", f".other.tmp-{dead}", "g"]  # a live writer's and another output's stay
    assert remove_stale_temps(out) == []


def _start(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "tensorstage.cli", *BIG, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent)


def _wait_for_files(parent: Path, n: int = 20, timeout_s: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        tmps = list(parent.glob(".g.tmp-*"))
        if tmps and len(list(tmps[0].iterdir())) >= n:
            return
        time.sleep(0.02)
    pytest.fail("the writer never started")


def test_ctrl_c_on_a_16384_rank_generate_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "g"
    proc = _start(out)
    _wait_for_files(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 130 and CANCEL_MESSAGE in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    # a second Ctrl-C while cleaning up: exits at once, no traceback; the next run removes the rest
    proc = _start(out)
    _wait_for_files(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    # "at once": status 130, or (rarely, when the second signal lands while the process is already
    # being torn down) death by SIGINT itself, which a shell reports as the same status 130
    assert proc.returncode in (130, -signal.SIGINT) and "Traceback" not in err, err
    assert time.monotonic() - t0 < 10
    time.sleep(0.5)  # the killed process's workers exit once their pipe closes
    remove_stale_temps(out)
    assert list(tmp_path.iterdir()) == []
