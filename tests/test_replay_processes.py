"""Replay on real processes: gloo over loopback everywhere; emulated links where root allows.

Where each test runs: ``test_loopback_*`` start real gloo processes on any machine. The
``netns`` tests need root and network namespaces (``ip netns add``); where those are missing (a
CI sandbox without ``CAP_NET_ADMIN``) they are skipped with the reason, and the loopback tests
are the coverage of the process path. Independent expectations: a link shaped by ``tc`` to rate
``B`` cannot move ``S`` bytes faster than ``S / B`` (a lower bound, robust on a loaded machine);
nothing the run created remains after it ends, after Ctrl-C, or after a ``kill -9`` once the
next run's sweep has run. Where the kernel has ``netem``, a link delayed by ``d`` cannot deliver
a message in less than ``d`` (nor a ring all-gather of ``n-1`` dependent steps in less than
``(n-1) d``); without ``netem`` a delay is refused in one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tensorstage.replay.bench import make_links, run_microbench
from tensorstage.replay.netns import (
    netem_available,
    netns_unavailable_reason,
    our_namespaces,
    our_veths,
    sweep_stale,
)
from tensorstage.replay.ops import BENCH_OPS

SRC = str(Path(__file__).resolve().parents[1] / "src")
NETNS = netns_unavailable_reason()
needs_netns = pytest.mark.skipif(NETNS is not None, reason=f"no emulated links here: {NETNS}")
NETEM = NETNS is None and netem_available()
needs_netem = pytest.mark.skipif(not NETEM, reason="no netem qdisc in this kernel (or no emulated links): "
                                 "a delay cannot be emulated")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def test_loopback_microbench_measures_every_operation() -> None:
    links = make_links(2, 1.0, 0.0)
    res = run_microbench(links, network="loopback", sizes_bytes=(2**16,), warmup=0, repeats=1, timeout_s=120)
    assert res.network == "loopback"
    assert sorted({s.case.op for s in res.samples}) == sorted(BENCH_OPS)
    assert all(s.time_s > 0 for s in res.samples)
    assert [f.tier for f in res.fits] == [0]


@needs_netns
def test_netns_shaped_link_is_not_faster_than_its_rate_and_leaves_nothing() -> None:
    rate_Bps, size = 20e6, 2 * 2**20
    links = make_links(2, rate_Bps / 1e9, 0.0)
    res = run_microbench(links, network="netns", ops=("send_recv",), sizes_bytes=(size,), warmup=0, repeats=1,
                         timeout_s=120)
    assert res.network == "netns"
    (sample,) = res.samples
    assert sample.time_s >= 0.97 * size / rate_Bps  # header bytes only make it slower
    assert our_namespaces(os.getpid()) == [] and our_veths(os.getpid()) == []


@needs_netns
def test_ctrl_c_during_a_run_removes_namespaces_veths_and_qdiscs() -> None:
    cmd = [sys.executable, "-m", "tensorstage.cli", "replay", "--bench", "--network", "netns", "--ranks", "2",
           "--ops", "send_recv", "--sizes", "8M", "--link-GBps", "0.001", "--repeats", "1", "--warmup", "0"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(our_namespaces(proc.pid)) < 3 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert len(our_namespaces(proc.pid)) == 3, "the run never set up its namespaces"
        time.sleep(1.0)  # workers are starting or running inside them
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "Traceback" not in err
    assert our_namespaces(proc.pid) == [] and our_veths(proc.pid) == []


@needs_netns
def test_leftovers_of_a_killed_run_are_swept() -> None:
    code = ("import time\nfrom tensorstage.replay.bench import make_links\n"
            "from tensorstage.replay.netns import EmulatedNetwork\n"
            "net = EmulatedNetwork(make_links(2, 0.01, 0.0)).__enter__()\nprint('up', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
        assert len(our_namespaces(proc.pid)) == 3
    finally:
        proc.kill()
        proc.wait()
    gone = sweep_stale()
    assert len([g for g in gone if g.startswith(f"ts{proc.pid}")]) == 3
    assert our_namespaces(proc.pid) == [] and our_veths(proc.pid) == []


@needs_netem
def test_netem_delay_is_paid_per_message_and_leaves_nothing() -> None:
    delay_s = 0.02
    links = make_links(4, 1.0, delay_s * 1e6)
    res = run_microbench(links, network="netns", ops=("send_recv", "all_gather"), sizes_bytes=(2**16,), warmup=1,
                         repeats=1, timeout_s=120)
    by_op = {s.case.op: s.time_s for s in res.samples}
    assert by_op["send_recv"] >= delay_s
    assert by_op["all_gather"] >= 3 * delay_s  # 3 ring steps, each waits for the previous one's data
    assert our_namespaces(os.getpid()) == [] and our_veths(os.getpid()) == []


@needs_netns
@pytest.mark.skipif(NETEM, reason="this kernel has netem: the delay is emulated, not refused")
def test_a_delay_without_netem_is_refused_in_one_line() -> None:
    from tensorstage.errors import SpecError

    with pytest.raises(SpecError, match="link_latency_us: this kernel has no netem"):
        run_microbench(make_links(2, 1.0, 100.0), network="netns", ops=("send_recv",), sizes_bytes=(2**16,),
                       warmup=0, repeats=1, timeout_s=60)
    assert our_namespaces(os.getpid()) == [] and our_veths(os.getpid()) == []
