"""Emulated links: one Linux network namespace per rank, veth pairs to a bridge, ``tc`` shaping.

Layout of a run with prefix ``P`` (``ts`` + this process id, so concurrent runs never collide and
a dead run's leftovers can be recognised):

* namespace ``Psw`` holds the bridge ``br0`` (the "switch"); namespace ``Pr<i>`` holds rank ``i``
  with interface ``eth0`` = ``10.<net>.0.<i+1>/24`` and its own loopback. The machine's own
  namespace only sees the namespaces: no interface, address or route of it changes, and traffic
  between ranks cannot leave the namespaces this run created.
* each rank's veth pair joins ``eth0`` to a bridge port ``p<i>``. Shaping, per rank and per
  direction (``eth0`` egress = what the rank sends, ``p<i>`` egress = what it receives): an
  ``htb`` root whose class ``1:10`` carries traffic to/from ranks of the same node at the intra
  rate and class ``1:20`` (``u32`` filters on the peer's address) traffic to/from other nodes at
  the inter rate; under each class a ``netem`` delay when a delay is asked for, else a ``bfifo``
  of ``queue_bytes``. That is a non-blocking switch with one port per rank and tier, as the
  simulator's :class:`~tensorstage.sim.collectives.Tier` assumes. MTU 9000 on every link: with
  TCP/IP headers the payload is 99.3 % of the shaped rate (1500 would give 96.4 %).

Teardown deletes the namespaces (that destroys their interfaces and qdiscs) and any veth left in
this namespace by an interrupted setup. :func:`sweep_stale` removes what a killed run (whose
process is gone) left behind; :class:`EmulatedNetwork` runs it before every setup.

Root (``CAP_NET_ADMIN``) and the ``ip``/``tc`` tools are needed; without them
:func:`netns_unavailable_reason` says why in one line, and the caller falls back to loopback.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any

from tensorstage.errors import SpecError
from tensorstage.replay.model import Links

MTU = 9000
_NAME = re.compile(r"^ts(\d+)(sw|r\d+)$")
_VETH = re.compile(r"^ts(\d+)[ab]\d+(@\S+)?$")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False, timeout=30) if not check \
        else _checked(["ip", *args])


def _checked(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip().splitlines()
        raise SpecError("network", f"`{' '.join(cmd)}` failed: {msg[-1] if msg else proc.returncode}")
    return proc


def netns_unavailable_reason() -> str | None:
    """Why emulated links cannot be set up here (one line), or None if they can."""
    if os.geteuid() != 0:
        return "emulated links need root (network namespaces, veth, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"emulated links need the `{tool}` tool (Debian: apt-get install iproute2)"
    probe = f"ts{os.getpid()}probe"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip() or made.returncode}"
    try:
        htb = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "handle", "1:",
                              "htb"], capture_output=True, text=True, check=False)
        if htb.returncode != 0:
            return f"the kernel cannot shape links (tc htb): {htb.stderr.strip() or htb.returncode}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def netem_available() -> bool:
    """Whether the kernel has the ``netem`` qdisc (needed to emulate a delay)."""
    probe = f"ts{os.getpid()}nq"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode != 0:
        return False
    try:
        res = subprocess.run(["ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                              "delay", "1ms"], capture_output=True, check=False)
        return res.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def our_namespaces(pid: int | None = None) -> list[str]:
    """Namespaces named like ours (of process ``pid`` if given)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    names = [ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()]
    return [n for n in names if (m := _NAME.match(n)) and (pid is None or int(m.group(1)) == pid)]


def our_veths(pid: int | None = None) -> list[str]:
    """veth interfaces named like ours left in this namespace (of process ``pid`` if given)."""
    res = subprocess.run(["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=False)
    out = []
    for ln in res.stdout.splitlines():
        parts = ln.split(":")
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            m = _VETH.match(name)
            if m and (pid is None or int(m.group(1)) == pid):
                out.append(name)
    return out


def sweep_stale() -> list[str]:
    """Delete namespaces and veths of earlier runs whose process no longer exists; returns their names."""
    gone = []
    for ns in our_namespaces():
        pid = int(_NAME.match(ns).group(1))  # type: ignore[union-attr]
        if not _alive(pid):
            _ip("netns", "del", ns, check=False)
            gone.append(ns)
    for v in our_veths():
        pid = int(_VETH.match(v).group(1))  # type: ignore[union-attr]
        if not _alive(pid):
            _ip("link", "del", v, check=False)
            gone.append(v)
    return gone


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _rate(bps: float) -> str:
    return f"{int(round(bps * 8))}bit"


@dataclass
class EmulatedNetwork:
    """Context manager: namespaces, veths, bridge and qdiscs for ``links``; all gone on exit."""

    links: Links
    queue_bytes: int = 4 * 2**20
    shape_receive: bool = False
    subnet: int = 77
    prefix: str = field(default_factory=lambda: f"ts{os.getpid()}")
    _prev_sigterm: Any = field(default=None, repr=False)

    def namespace(self, rank: int) -> str:
        return f"{self.prefix}r{rank}"

    def address(self, rank: int) -> str:
        return f"10.{self.subnet}.{rank // 250}.{rank % 250 + 1}"

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    def __enter__(self) -> EmulatedNetwork:
        reason = netns_unavailable_reason()
        if reason:
            raise SpecError("network", reason)
        if any(t.latency_s > 0 for t in self.links.tiers) and not netem_available():
            raise SpecError("link_latency_us", "this kernel has no netem qdisc, so a delay cannot be emulated; "
                            "use 0 (the measured per-message latency is fitted anyway)")
        if self.links.ranks > 250 * 250:
            raise SpecError("ranks", "at most 62500 ranks in one emulated network")
        sweep_stale()
        if threading.current_thread() is threading.main_thread():
            # a plain `kill` must tear down too: turn SIGTERM into the same path as Ctrl-C
            self._prev_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            self._setup()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.teardown()
        finally:
            if self._prev_sigterm is not None:
                signal.signal(signal.SIGTERM, self._prev_sigterm)
                self._prev_sigterm = None

    def _node(self, rank: int) -> int:
        return rank // self.links.node_size if self.links.two_tier else 0

    def _setup(self) -> None:
        sw = self.switch
        _ip("netns", "add", sw)
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "mtu", str(MTU), "up")
        for r in range(self.links.ranks):
            ns, a, b = self.namespace(r), f"{self.prefix}a{r}", f"{self.prefix}b{r}"
            _ip("netns", "add", ns)
            _ip("link", "add", a, "mtu", str(MTU), "type", "veth", "peer", "name", b, "mtu", str(MTU))
            _ip("link", "set", a, "netns", ns)
            _ip("link", "set", b, "netns", sw)
            _ip("-n", ns, "link", "set", a, "name", "eth0")
            _ip("-n", sw, "link", "set", b, "name", f"p{r}")
            _ip("-n", ns, "addr", "add", f"{self.address(r)}/16", "dev", "eth0")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", sw, "link", "set", f"p{r}", "master", "br0", "up")
            self._shape(ns, "eth0", r, "dst")
            if self.shape_receive:
                self._shape(sw, f"p{r}", r, "src")

    def _shape(self, ns: str, dev: str, rank: int, match: str) -> None:
        """htb root with an intra-node class (default) and an inter-node class (filtered by peer)."""
        tc = ["ip", "netns", "exec", ns, "tc"]
        tiers = self.links.tiers
        _checked([*tc, "qdisc", "add", "dev", dev, "root", "handle", "1:", "htb", "default", "10"])
        classes = [(10, tiers[0])] + ([(20, tiers[1])] if self.links.two_tier else [])
        for cid, tier in classes:
            rate = _rate(tier.rate_Bps)
            _checked([*tc, "class", "add", "dev", dev, "parent", "1:", "classid", f"1:{cid}", "htb", "rate", rate,
                      "ceil", rate])
            if tier.latency_s > 0:
                leaf = ["netem", "delay", f"{tier.latency_s * 1e6:.0f}us", "limit", "100000"]
            else:
                leaf = ["bfifo", "limit", str(self.queue_bytes)]
            _checked([*tc, "qdisc", "add", "dev", dev, "parent", f"1:{cid}", "handle", f"{cid}:", *leaf])
        if self.links.two_tier:
            for peer in range(self.links.ranks):
                if self._node(peer) != self._node(rank):
                    _checked([*tc, "filter", "add", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                              "match", "ip", match, f"{self.address(peer)}/32", "flowid", "1:20"])

    def teardown(self) -> None:
        """Delete everything this run created (idempotent)."""
        pid = int(self.prefix[2:]) if self.prefix[2:].isdigit() else None
        for ns in our_namespaces(pid):
            if ns.startswith(self.prefix):
                _ip("netns", "del", ns, check=False)
        for v in our_veths(pid):
            if v.startswith(self.prefix):
                _ip("link", "del", v, check=False)
