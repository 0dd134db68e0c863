"""A multi-node Ray cluster on one machine: network namespaces joined by veth pairs to a bridge.

Each node is a namespace with its own loopback and one address on a private subnet that exists
only inside these namespaces (10.213.0.0/24), so a process on one node cannot reach another's
127.0.0.1 — exactly the boundary between two machines. The bridge lives in a namespace of its
own; taking a node's veth down there partitions that node.

Every process runs inside a namespace, so `ip netns pids` finds them all: `close()` ends them by
id, deletes the namespaces (their veths go with them) and the Ray temp dir, also on failure
(callers use it as a context manager; `atexit` covers an interpreter that exits early). Needs root
and `ip` (iproute2); `available()` says why not where it cannot run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SUBNET = "10.213.0"
RAY_PORT = 6379
_CLONE_NEWNET = 0x40000000
BIN = Path(sys.executable).parent


def available() -> str | None:
    """None if namespaces can be built here, else why not (the skip reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"pdsprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


@dataclass
class Node:
    name: str  # node_a, node_b, ...: also its custom Ray resource
    ns: str
    ip: str
    veth: str  # bridge-side end, in the bridge namespace


@dataclass
class NetnsCluster:
    names: list[str]
    cpus: int = 2
    shared: dict[str, float] = field(default_factory=dict)  # custom resources every node also gets
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:4])
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bridge_ns = f"pds{self.tag}-br"
        self.temp_dir = tempfile.mkdtemp(prefix=f"pds{self.tag}", dir="/tmp")  # short: Ray's socket paths
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self._address_file = Path("/tmp/ray/ray_current_cluster")
        self._address_before = self._address_file.read_bytes() if self._address_file.exists() else None
        self._closed = False
        atexit.register(self.close)

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def address(self) -> str:
        return f"{self.head.ip}:{RAY_PORT}"

    # ---- network --------------------------------------------------------------------------

    def build(self) -> NetnsCluster:
        _ip("netns", "add", self.bridge_ns)
        _ip("link", "add", "br0", "type", "bridge", ns=self.bridge_ns)
        _ip("link", "set", "br0", "up", ns=self.bridge_ns)
        _ip("link", "set", "lo", "up", ns=self.bridge_ns)
        for i, name in enumerate(self.names):
            node = Node(name, f"pds{self.tag}-{name}", f"{SUBNET}.{i + 1}", f"pds{self.tag}b{i}")
            inner = f"pds{self.tag}n{i}"
            _ip("netns", "add", node.ns)
            self.nodes.append(node)
            _ip("link", "add", node.veth, "type", "veth", "peer", "name", inner)
            _ip("link", "set", node.veth, "netns", self.bridge_ns)
            _ip("link", "set", inner, "netns", node.ns)
            _ip("link", "set", node.veth, "master", "br0", "up", ns=self.bridge_ns)
            _ip("addr", "add", f"{node.ip}/24", "dev", inner, ns=node.ns)
            _ip("link", "set", inner, "up", ns=node.ns)
            _ip("link", "set", "lo", "up", ns=node.ns)
        return self

    def link(self, node: Node, up: bool) -> None:
        """Connect or cut `node` from the others (its bridge port), as a partition does."""
        _ip("link", "set", node.veth, "up" if up else "down", ns=self.bridge_ns)

    def throttle(self, node: Node, rate: str | None) -> None:
        """Limit traffic towards `node` to `rate` (tc syntax, e.g. "4mbit"); None removes the limit."""
        cmd = (["qdisc", "replace", "dev", node.veth, "root", "tbf", "rate", rate, "burst", "32kbit",
                "latency", "400ms"] if rate else ["qdisc", "del", "dev", node.veth, "root"])
        r = subprocess.run(["ip", "netns", "exec", self.bridge_ns, "tc", *cmd], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"tc {' '.join(cmd)}: {r.stderr.strip()}")

    # ---- processes ----------------------------------------------------------------------------

    def run(self, node: Node, argv: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", node.ns, *argv], env=self.env, capture_output=True,
                              text=True, timeout=timeout_s)

    def popen(self, node: Node, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "wb") as f:
            return subprocess.Popen(["ip", "netns", "exec", node.ns, *argv], env=self.env, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def start_ray(self, node: Node, timeout_s: float = 180.0) -> None:
        """`ray start` on `node`: the head first, then the others join it. Each gets its name as a
        custom resource, so pools pin to node types exactly as cluster.yaml's do."""
        common = ["--node-ip-address", node.ip, "--num-cpus", str(self.cpus),
                  "--resources", json.dumps({node.name: 1, **self.shared}), "--object-store-memory", str(200 << 20),
                  "--disable-usage-stats"]
        where = (["--head", "--port", str(RAY_PORT), "--include-dashboard=false", "--temp-dir", self.temp_dir]
                 if node is self.head else ["--address", self.address])
        r = self.run(node, [str(BIN / "ray"), "start", *where, *common], timeout_s)
        self._restore_address_file()
        if r.returncode != 0:
            raise RuntimeError(f"ray start on {node.name} failed:\n{r.stdout}\n{r.stderr}")

    def start(self) -> NetnsCluster:
        self.build()
        for node in self.nodes:
            self.start_ray(node)
        return self

    def stop_node(self, node: Node, sig: int = signal.SIGKILL) -> list[int]:
        """Signal every process running on `node` (all of them: Ray's and ours); returns their ids."""
        pids = self._pids(node.ns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return pids

    def _pids(self, ns: str) -> list[int]:
        r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
        return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []

    def _restore_address_file(self) -> None:
        """`ray start` must not leave /tmp/ray/ray_current_cluster naming this cluster (other Ray
        users on the machine would auto-join it); with --temp-dir it writes there, but check."""
        now = self._address_file.read_bytes() if self._address_file.exists() else None
        if now != self._address_before:
            if self._address_before is None:
                self._address_file.unlink(missing_ok=True)
            else:
                self._address_file.write_bytes(self._address_before)

    # ---- clients in a namespace -------------------------------------------------------------

    def executor(self, node: Node) -> ThreadPoolExecutor:
        """A one-thread executor whose thread lives in `node`'s network namespace (sockets it opens
        are that node's): run HTTP clients there."""
        return ThreadPoolExecutor(1, initializer=_enter_netns, initargs=(node.ns,))

    # ---- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        namespaces = [n.ns for n in self.nodes]
        for ns in namespaces:
            for pid in self._pids(ns):
                _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(self._pids(ns) for ns in namespaces):
            time.sleep(0.2)
        for ns in namespaces:
            for pid in self._pids(ns):
                _signal(pid, signal.SIGKILL)
        for ns in [*namespaces, self.bridge_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._restore_address_file()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> NetnsCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def serve(cluster: NetnsCluster, cfg: dict[str, Any], tmp: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """`pdserve serve --config` of `cfg` in the head's namespace; stopped (SIGTERM, then SIGKILL) on the way out."""
    path, log = tmp / "serve.yaml", tmp / "serve.log"
    path.write_text(yaml.safe_dump(cfg))
    proc = cluster.popen(cluster.head, [str(BIN / "pdserve"), "serve", "--address", cluster.address,
                                        "--config", str(path), *args], log)
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns}")
    finally:
        os.close(fd)


def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes], timeout_s: float) -> re.Match[str]:
    """The first match of `pattern` in `log`; raises if `proc` exits or `timeout_s` passes first."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {pattern!r}:\n{text[-4000:]}")
        time.sleep(0.5)
    raise TimeoutError(f"no {pattern!r} after {timeout_s:g} s:\n{(log.read_text(errors='replace'))[-4000:]}")
