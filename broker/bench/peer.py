"""A peer for context: Mosquitto with QoS 1 and persistence on, same shape of load.

When ``mosquitto`` is installed (``shutil.which``), the benchmark starts it on a free loopback
port with a temporary configuration (``persistence true`` in a temporary directory, no limit on
queued or in-flight messages, so that nothing is dropped), and runs the throughput plan's
shape with the hand-written MQTT 3.1.1 client of :mod:`broker.bench.mqtt`: three publisher
processes, three subscribers, each message delivered to two of them (two subscribe to the
topic, the third to another), QoS 1 both ways, the same message size and count. Then it stops
it. Mosquitto keeps QoS 1 messages in memory and writes its database on its autosave interval
and at shutdown: it does not commit each message before its PUBACK, unlike the broker, whose
receipts follow a durable commit (``docs/performance.md``).

Without Mosquitto the scenario is skipped with a line saying so. ``nats-server`` is detected
and named, but no JetStream runner is implemented.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from broker.bench import mqtt
from broker.bench.context import Run
from broker.bench.harness import free_port, process_cpu_seconds, process_rss_bytes
from broker.bench.load import LoadPlan, run_load

HOST = "127.0.0.1"
TOPIC, OTHER = "bench/tput", "bench/other"


class Mosquitto:
    """``with Mosquitto(binary, workdir) as server``: a mosquitto process on a free port."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self._process: subprocess.Popen[bytes] | None = None

    def config(self) -> Path:
        store = self.workdir / "store"
        store.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "mosquitto.conf"
        path.write_text(
            f"listener {self.port} {HOST}\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {store}/\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "set_tcp_nodelay true\n"
            f"log_dest file {self.workdir / 'mosquitto.log'}\n"
        )
        return path

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def start(self, timeout: float = 20.0) -> None:
        self._process = subprocess.Popen([self.binary, "-c", str(self.config())],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self._process.returncode})")
            try:
                socket.create_connection((HOST, self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not listen in time")

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(20)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def plan(port: int, messages: int, size: int, window: int) -> LoadPlan:
    """Three publishers, three subscribers; two of them get every message."""
    share = [messages // 3 + (i < messages % 3) for i in range(3)]
    publishers = [mqtt.MqttPublisherSpec(HOST, port, f"bench-pub-{i + 1}", TOPIC, count, size,
                                         window) for i, count in enumerate(share)]
    topics = (TOPIC, TOPIC, OTHER)
    subscribers = [mqtt.MqttSubscriberSpec(HOST, port, (f"bench-sub-{i + 1}",), (topic,),
                                           (messages if topic == TOPIC else 0,))
                   for i, topic in enumerate(topics)]
    return LoadPlan(publishers, subscribers, publisher_main=mqtt.publisher_main,
                    subscriber_main=mqtt.subscriber_main)


def skipped() -> str | None:
    """Why the scenario cannot run here, or ``None`` when it can."""
    if shutil.which("mosquitto"):
        return None
    if shutil.which("nats-server"):
        return ("nats-server is installed but only a Mosquitto runner is implemented; "
                "mosquitto is not installed")
    return "neither mosquitto nor nats-server is installed (install mosquitto to compare)"


def run(bench: Run) -> dict[str, Any]:
    """Run the plan against Mosquitto, or say why not."""
    reason = skipped()
    binary = shutil.which("mosquitto")
    if reason is not None or binary is None:
        return {"status": "skipped", "reason": reason, "count": 0}
    options = bench.options
    size = bench.results.get("throughput", {}).get("envelope_bytes") or options.size
    with Mosquitto(binary, bench.workdir / "mosquitto") as server:
        result = run_load(plan(server.port, options.messages, size, options.window), server)
    return {"status": "ok", "peer": "mosquitto", "qos": 1, "persistence": True,
            "count": result.messages, **result.summary()}
