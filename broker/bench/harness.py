"""The benchmark's coalition and broker process.

:func:`bench_coalition` writes one throwaway coalition (five nations, the default agreement)
with every node the scenarios use. :class:`BrokerProcess` runs ``coalition broker serve`` on
``127.0.0.1:0`` from a configuration :func:`write_config` writes (durable SQLite store in its
own data directory, admin API off, abuse rate limits raised: see ``docs/performance.md``) and
reads the process's resident memory and CPU time from ``/proc``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from broker.admin.auth import hash_token
from broker.bench.scrape import Snapshot, fetch
from broker.coalition import Coalition, NodeSpec, build_coalition
from broker.serve import PID_FILE
from broker.server import NODE_PATH

NATIONS = ("DEU", "FRA", "GBR", "POL", "USA")
#: The throughput and latency publishers (one process each).
PUBLISHERS = ("USA-P1", "USA-P2", "USA-P3")
#: The throughput subscribers: the label releases to FRA and GBR, so DEU-S1 is a denied
#: candidate (``not_in_audience``) and each message goes to two of the three.
SUBSCRIBERS = ("GBR-S1", "FRA-S1", "DEU-S1")
AUDIENCE = ("FRA", "GBR")
#: Fan-out recipients, nations in turn; the fan-out label releases to all four.
FANOUT_NATIONS = ("GBR", "FRA", "DEU", "POL")
FANOUT = tuple(f"{FANOUT_NATIONS[i % 4]}-F{i + 1:02d}" for i in range(16))
#: The node the backlog is queued for while it is offline.
OFFLINE = "POL-OFF"
#: Audit entries, queues and envelope timestamps stay valid for the whole run.
TTL_S = 3600


def nation_of(node: str) -> str:
    """The nation of a benchmark node (its id starts with the nation code)."""
    return node.split("-", 1)[0]


def bench_coalition(base: Path) -> Coalition:
    """Write the benchmark coalition under ``base`` (keys in ``base/keys``)."""
    nodes = [NodeSpec(node, nation_of(node))
             for node in (*PUBLISHERS, *SUBSCRIBERS, *FANOUT, OFFLINE)]
    return build_coalition(base, nations=NATIONS, nodes=nodes, now_ms=time.time_ns() // 1_000_000)


def free_port() -> int:
    """A loopback port that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(path: Path, coalition: Coalition, data_dir: Path, port: int, *,
                 commit_delay_ms: int | None = None, verify_workers: int | None = None,
                 writer: str | None = None, admin: tuple[int, str] | None = None) -> Path:
    """A broker configuration for ``coalition`` at ``path``.

    Production defaults (the audit group-commit delay, the signature workers and the audit
    writer too, unless ``commit_delay_ms``, ``verify_workers`` or ``writer`` is given),
    except: the admin listener off, or with ``admin = (port, token)`` on loopback with that
    viewer token (the harness reads ``/metrics``); the per-connection abuse rate limits
    (2,000 frames/s by default) raised so that they do not cap a load generator; the clock
    skew an envelope may have widened to an hour, since envelopes are built before the run;
    queues may hold up to 16 GiB per node (the backlog).
    """
    path.write_text(
        "[broker]\n"
        f'name = "{coalition.broker_name}"\n'
        f'data_dir = "{data_dir}"\n'
        f'key = "{coalition.keys_dir / "broker.key"}"\n'
        + ("" if verify_workers is None else f"verify_workers = {verify_workers}\n")
        + f'[listen]\nhost = "127.0.0.1"\nport = {port}\n'
        "[policy]\n"
        f'dir = "{coalition.policy_dir}"\n'
        f'trust_root_sha256 = "{coalition.root_sha256.hex()}"\n'
        + "[audit]\n"
        + ("" if commit_delay_ms is None else f"max_delay_ms = {commit_delay_ms}\n")
        + ("" if writer is None else f'writer = "{writer}"\n')
        + "[limits]\n"
        "frames_per_second = 1000000\nframes_burst = 10000000\n"
        "bytes_per_second = 1099511627776\nbytes_burst = 1099511627776\n"
        "clock_skew_seconds = 3600\n"
        "max_queued_bytes_per_node = 17179869184\n"
        + ("[admin]\nport = -1\n" if admin is None else
           f'[admin]\nhost = "127.0.0.1"\nport = {admin[0]}\n[[admin.tokens]]\n'
           f'name = "bench"\nrole = "viewer"\nsha256 = "{hash_token(admin[1]).hex()}"\n')
    )
    return path


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from ``/proc/PID/stat``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def process_tree(pid: int) -> list[int]:
    """``pid`` and every living descendant (from ``/proc/PID/task/TID/children``): the broker
    and its store writer process."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for children in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                todo.extend(int(child) for child in children.read_text().split())
            except OSError:  # the task or process ended meanwhile
                continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its living descendants (see :func:`process_tree`)."""
    return sum(_if_alive(process_cpu_seconds, p) for p in process_tree(pid))


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and its living descendants, added up."""
    return sum(_if_alive(process_rss_bytes, p) for p in process_tree(pid))


_N = TypeVar("_N", int, float)


def _if_alive(measure: Callable[[int], _N], pid: int) -> _N | int:
    try:
        return measure(pid)
    except (FileNotFoundError, ProcessLookupError):
        return 0


def process_rss_bytes(pid: int) -> int:
    """Resident memory of a process (``VmRSS`` of ``/proc/PID/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_ticks() -> tuple[int, int]:
    """The machine's CPU time stolen by the hypervisor and its CPU time in all, both in clock
    ticks over every CPU since boot (from ``/proc/stat``; (0, 0) where it cannot be read)."""
    try:
        return parse_machine_ticks(Path("/proc/stat").read_text())
    except OSError:
        return 0, 0


def parse_machine_ticks(stat: str) -> tuple[int, int]:
    """Steal and total ticks from the text of ``/proc/stat`` (its first, ``cpu`` line: user
    nice system idle iowait irq softirq steal guest guest_nice; guest time is counted in user
    and nice already, so the total stops at steal). (0, 0) for a line it cannot read."""
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu":
        return 0, 0
    try:
        ticks = [int(field) for field in fields[1:9]]
    except ValueError:
        return 0, 0
    return (ticks[7] if len(ticks) > 7 else 0), sum(ticks)


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of the machine's CPU time the hypervisor took between two
    :func:`machine_ticks` (0 when none passed)."""
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 4) if total > 0 else 0.0


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages."""
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)


def py_spy() -> str | None:
    """The ``py-spy`` sampling profiler beside this Python, or on the ``PATH``."""
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


class BrokerError(RuntimeError):
    """The broker process did not start or stop as expected."""


class BrokerProcess:
    """``with BrokerProcess(config, ...) as broker``: a ``coalition broker serve`` process.

    Ready once it wrote its pid file (it does after its listener is up). Its JSON log goes to
    ``log`` (a file, so nobody has to drain a pipe). With ``profile`` (a path without suffix)
    the process is sampled by ``py-spy`` when it is installed (collapsed stacks in
    ``PROFILE.pyspy.txt``; sampling does not pause the broker), else run under :mod:`cProfile`
    (``PROFILE.prof``, written when it stops; much slower).
    """

    def __init__(self, config: Path, *, data_dir: Path, port: int, log: Path,
                 log_level: str = "info", profile: Path | None = None,
                 admin: tuple[int, str] | None = None) -> None:
        self.config = config
        #: ``(port, token)`` of its admin API, as :func:`write_config` was given them.
        self.admin = admin
        self.pid_file = data_dir / PID_FILE
        self.url = f"ws://127.0.0.1:{port}{NODE_PATH}"
        self.log = log
        self.log_level = log_level
        self.profile = profile
        self.profile_output: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._spy: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise BrokerError("the broker is not running")
        return self._process.pid

    def start(self, timeout: float = 60.0) -> None:
        """Start the process; return once it listens."""
        spy = py_spy() if self.profile is not None else None
        runner: list[str] = []
        if self.profile is not None and spy is None:
            self.profile_output = self.profile.with_suffix(".prof")
            runner = ["-m", "cProfile", "-o", str(self.profile_output)]
        command = [sys.executable, *runner, "-m", "broker.cli", "broker", "serve",
                   "--config", str(self.config), "--log-level", self.log_level]
        with self.log.open("ab") as sink:  # appended: a restart keeps the first run's lines
            self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=sink)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"broker exited ({self._process.returncode}) before it was "
                                  f"ready: {self._tail()}")
            if self.pid_file.exists():
                if spy is not None and self.profile is not None:
                    self.profile_output = self.profile.with_suffix(".pyspy.txt")
                    self._spy = subprocess.Popen(
                        [spy, "record", "--pid", str(self.pid), "--rate", "250",
                         "--nonblocking", "--format", "raw", "--output",
                         str(self.profile_output)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                return
            time.sleep(0.05)
        self.kill()
        raise BrokerError(f"broker not ready after {timeout:g} s: {self._tail()}")

    def _tail(self) -> str:
        return b"".join(self.log.read_bytes().splitlines(keepends=True)[-5:]).decode(
            errors="replace")

    def metrics_snapshot(self) -> Snapshot | None:
        """Its ``/metrics`` (:mod:`broker.bench.scrape`); ``None`` without an admin API."""
        if self.admin is None:
            return None
        return fetch(f"http://127.0.0.1:{self.admin[0]}", self.admin[1])

    def rss_bytes(self) -> int:
        """The broker's resident memory, its store writer process's included."""
        return tree_rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        """The broker's CPU time, its store writer process's included."""
        return tree_cpu_seconds(self.pid)

    def log_events(self, event: str) -> int:
        """How many log lines name ``event`` (e.g. errors the broker logged)."""
        return sum(1 for line in self.log.read_bytes().splitlines()
                   if f'"event": "{event}"'.encode() in line)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the broker commits and closes its log), then wait."""
        if self._spy is not None:  # it writes its output when interrupted
            self._spy.send_signal(signal.SIGINT)
            try:
                self._spy.wait(timeout)
            except subprocess.TimeoutExpired:
                self._spy.kill()
            self._spy = None
        if self._process is None:
            return 0
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            return self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BrokerError(f"broker did not stop within {timeout:g} s") from None

    def kill(self) -> None:
        if self._spy is not None and self._spy.poll() is None:
            self._spy.kill()
            self._spy.wait()
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def __enter__(self) -> BrokerProcess:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.stop()
        else:
            self.kill()
