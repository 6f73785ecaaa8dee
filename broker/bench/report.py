"""Tables on the terminal and the JSON document of a ``coalition bench`` run.

Ratios compare a scenario's message rate with the limits measured in the same run:
``vs_verify`` = messages/s ÷ Ed25519 verifications/s, ``vs_unpack`` = messages/s ÷ (unpack +
verify + hash)/s, ``vs_ws_echo`` = messages/s ÷ WebSocket echoes/s (one message in and one
out per echo; the broker reads a ``pub`` and writes a receipt and a ``deliver`` per copy),
``vs_relay`` = messages/s ÷ the throughput plan's messages/s through a server that only relays
(:mod:`broker.bench.relay`: the same frames, no checks, no disk).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

from broker.bench.harness import load_average

Result = Mapping[str, Any]
LIMITS = {"vs_verify": "ed25519_verify_per_s", "vs_unpack": "unpack_verify_hash_per_s",
          "vs_ws_echo": "ws_echo_per_s", "vs_relay": "relay_per_s"}


def ratios(rate: float, limits: Result | None) -> dict[str, float | None]:
    """``rate`` over each measured limit (``None`` where the limit was not measured)."""
    out: dict[str, float | None] = {}
    for name, key in LIMITS.items():
        limit = (limits or {}).get(key)
        out[name] = round(rate / limit, 4) if limit else None
    return out


def add_ratios(results: dict[str, dict[str, Any]]) -> None:
    """Add ``ratios`` to every message rate the run measured."""
    limits = results.get("limits") if results.get("limits", {}).get("status") == "ok" else None
    for name in ("throughput", "peer"):
        result = results.get(name, {})
        if result.get("status") == "ok":
            result["ratios"] = ratios(result["messages_per_s"], limits)
    for name, key in (("fanout", "points"), ("policy", "sizes")):
        result = results.get(name, {})
        for point in result.get(key, []) if result.get("status") == "ok" else []:
            point["ratios"] = ratios(point["messages_per_s"], limits)
    backlog = results.get("backlog", {})
    if backlog.get("status") == "ok":
        backlog["drain_ratios"] = ratios(backlog["drain_messages_per_s"], limits)
    peer, tput = results.get("peer", {}), results.get("throughput", {})
    if peer.get("status") == "ok" and tput.get("status") == "ok" and peer["messages_per_s"]:
        peer["broker_over_peer"] = round(tput["messages_per_s"] / peer["messages_per_s"], 4)


def meta(options: Mapping[str, Any], scenarios: Sequence[str]) -> dict[str, Any]:
    """Where and when the run happened, with what, and how loaded the machine was."""
    versions: dict[str, str | None] = {}
    for package in ("aiohttp", "msgpack", "PyNaCl", "uvloop"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "cpu_model": _cpu_model(),
        "python": platform.python_version(), "platform": platform.platform(),
        "versions": versions, "load_average_start": load_average(),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.items()},
        "scenarios": list(scenarios),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]],
          out: TextIO = sys.stdout) -> None:
    """A plain text table: the first column left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}", file=out)
    for index, row in enumerate(cells):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))), file=out)
        if index == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ratio_cells(result: Result) -> list[object]:
    values = result.get("ratios") or {}
    return [values.get(name) for name in LIMITS]


RATIO_HEADER = ["÷verify", "÷unpack", "÷ws echo", "÷relay"]


def print_scenario(name: str, result: Result, out: TextIO = sys.stdout) -> None:
    """The table of one scenario (or the line saying why it did not run)."""
    if result.get("status") != "ok":
        print(f"\n{name}: {result.get('status')}: {result.get('reason')}", file=out)
        return
    PRINTERS[name](result, out)


def _limits(r: Result, out: TextIO) -> None:
    table(f"limits (one process each, {r['envelope_bytes']}-byte envelope)", ["limit", "per s"], [
        ["Ed25519 verify (PyNaCl, one core)", r["ed25519_verify_per_s"]],
        ["unpack + verify + hash", r["unpack_verify_hash_per_s"]],
        [f"aiohttp WebSocket echo ({r['ws_echo_bytes']} B, window {r['ws_echo_window']})",
         r["ws_echo_per_s"]],
        ["relay: the throughput plan, no checks, no disk (msg/s)", r["relay_per_s"]],
    ], out)
    b = r.get("budget")
    if b is None:
        print("\nthe machine's budget: not measured (a part's CPU was below the clock's tick)",
              file=out)
        return
    parts = b["parts_us_per_message"]
    table(f"the machine's budget ({b['cores']} cores; CPU µs per message of the throughput plan)",
          ["part", "µs"], [
              ["Ed25519 verify", parts["verify"]],
              ["durable audit log: route + 2 deliver entries", parts["audit"]],
              ["frames and routing (the relay's CPU)", parts["frames"]],
              ["load generators (during the relay run)", parts["load"]],
              ["sum", b["total_us_per_message"]],
              ["bound: msg/s with every core busy and nothing else done",
               b["bound_messages_per_s"]],
              ["bound ÷verify", b["bound_vs_verify"]],
          ], out)


def _throughput(r: Result, out: TextIO) -> None:
    table("throughput (3 publishers → 3 subscribers, 2 copies per message)",
          ["measure", "value"], [
              ["messages", r["messages"]], ["copies delivered", r["copies"]],
              ["messages/s", r["messages_per_s"]], ["copies/s", r["copies_per_s"]],
              ["broker CPU µs/message", r["broker_cpu_us_per_message"]],
              ["broker CPU share (1 = one core)", r["broker_cpu_share"]],
              ["broker RSS after (MiB)", r["broker_rss_after"] / (1 << 20)],
              ["errors", json.dumps(r["errors"])],
              *_broker_rows(r.get("broker")),
              *[[f"messages/s {h}", v] for h, v in zip(RATIO_HEADER, _ratio_cells(r),
                                                          strict=True)]], out)


def _broker_rows(b: Result | None) -> list[list[object]]:
    """The broker's own account (:mod:`broker.bench.scrape`), when it was read."""
    if b is None:
        return []
    return [
        ["audit commits (entries each, ms each)",
         f"{b['commits']:,} ({_cell(b['entries_per_commit'])}, {_cell(b['commit_ms_mean'])})"],
        ["audit commit running (share of the run)", b["commit_busy_share"]],
        ["event-loop lag p50 / p99 ≤ (ms)",
         f"{_cell(b['loop_lag_p50_le_ms'])} / {_cell(b['loop_lag_p99_le_ms'])}"],
    ]


def _latency(r: Result, out: TextIO) -> None:
    table(f"latency publish→deliver (max rate {r['max_rate']:,.0f} msg/s"
          f"{', probed' if r['max_rate_probed'] else ''})",
          ["rate", "target/s", "achieved/s", "copies", "p50 ms", "p99 ms", "p99.9 ms",
           "max ms", "steal %", "loop lag p99≤", "floor p50", "floor p99", "durable p50",
           "durable p99", "floors' steal %"],
          [[f"{p['fraction']:.0%}", p["target_rate"], p["achieved_rate"], p["copies"],
            p["p50_ms"], p["p99_ms"], p["p99.9_ms"], p["max_ms"], _percent(p["steal_share"]),
            (p.get("broker") or {}).get("loop_lag_p99_le_ms"),
            p["floor"]["p50_ms"], p["floor"]["p99_ms"], *_durable(p.get("durable_floor")),
            " / ".join(_percent(f["steal_share"]) for f in (p["floor"], p.get("durable_floor"))
                       if f is not None)] for p in r["points"]], out)
    print("floor: the same load at the same rate through a server that only relays (no "
          "checks, no disk); durable: the same with the envelopes written and fdatasync-ed "
          "(grouped) before their frames leave (the design's one cost before any delivery); "
          "the three run in turn at each point; steal %: the machine's CPU time the "
          "hypervisor took meanwhile; loop lag: how late the broker's event loop ran a timer "
          "(ms, a histogram bucket's bound)", file=out)


def _durable(floor: Result | None) -> list[object]:
    return [None, None] if floor is None else [floor["p50_ms"], floor["p99_ms"]]


def _percent(share: float) -> str:
    return f"{share * 100:.1f}"


def _fanout(r: Result, out: TextIO) -> None:
    table(f"fan-out 1→N ({r['payload_bytes']}-byte payload)",
          ["N", "envelope B", "messages/s", "copies/s", "CPU µs/msg", "CPU µs/copy",
           *RATIO_HEADER],
          [[p["recipients"], p["envelope_bytes"], p["messages_per_s"], p["copies_per_s"],
            p["broker_cpu_us_per_message"], p["broker_cpu_us_per_copy"], *_ratio_cells(p)]
           for p in r["points"]], out)


def _policy(r: Result, out: TextIO) -> None:
    table("policy scale (1 publisher → 2 candidates; broker process, and policy part "
          "in-process)",
          ["nations / DSAs", "messages/s", "broker CPU µs/msg", "rounds µs/msg",
           "policy cold µs", "policy warm µs", "decide() miss µs"],
          [[f"{s['nations']} / {s['agreements']}", s["messages_per_s"],
            s["broker_cpu_us_per_message"],
            " ".join(f"{cpu:g}" for cpu in s.get("broker_cpu_us_per_message_rounds", ())),
            s.get("publish_policy_cold_us"), s.get("publish_policy_warm_us"),
            s.get("decide_miss_us")] for s in r["sizes"]],
          out)
    ratio = r["cpu_per_message_large_over_small"]
    print("broker CPU per message, large ÷ small: "
          + (str(ratio) if ratio is not None else "n/a (below the CPU clock's 10 ms tick)"),
          file=out)


def _auditor(r: Result, out: TextIO) -> None:
    table(f"auditor ({r['entries']:,} entries)", ["measure", "per s"], [
        ["group commit (SQLite WAL, synchronous=FULL)", r["group_commit_per_s"]],
        [f"offline verify, entries (with decision replay; {r['verify_workers']} workers)",
         r["verify_entries_per_s"]],
        ["decisions replayed", r["replay_decisions_per_s"]],
        ["offline verify, entries, in line (no workers)", r["verify_in_line_entries_per_s"]],
    ], out)


def _backlog(r: Result, out: TextIO) -> None:
    table(f"backlog ({r['messages']:,} messages for an offline node)", ["measure", "value"], [
        ["fill messages/s (all queued)", r["fill_messages_per_s"]],
        ["broker RSS idle / queued / drained (MiB)",
         f"{r['broker_rss_idle_mib']} / {r['broker_rss_queued_mib']} / "
         f"{r['broker_rss_drained_mib']}"],
        ["RSS bytes per queued message", r["rss_bytes_per_queued_message"]],
        ["restart to listening, all queued (s)", r["restart_s"]],
        ["broker RSS after the restart (MiB)", r["broker_rss_restarted_mib"]],
        ["drain messages/s", r["drain_messages_per_s"]],
        ["drain broker CPU µs/message", r["drain_broker_cpu_us_per_message"]],
    ], out)


def _gateway(r: Result, out: TextIO) -> None:
    table(f"gateway consume ({r['messages']:,} queued messages, GatewayClient.messages())",
          ["mode", "state_dir", "finish_batch", "messages/s", "client CPU µs/msg"],
          [[m["mode"], "yes" if m["state_dir"] else "no", m["finish_batch"],
            m["messages_per_s"], m["cpu_us_per_message"]] for m in r["modes"]], out)


def _peer(r: Result, out: TextIO) -> None:
    table("peer: Mosquitto, QoS 1, persistence on (same plan)", ["measure", "value"], [
        ["messages/s", r["messages_per_s"]], ["copies/s", r["copies_per_s"]],
        ["server CPU share", r["broker_cpu_share"]],
        ["coalition broker ÷ Mosquitto", r.get("broker_over_peer")],
    ], out)


PRINTERS: dict[str, Callable[[Result, TextIO], None]] = {
    "limits": _limits, "throughput": _throughput, "latency": _latency, "fanout": _fanout,
    "policy": _policy, "auditor": _auditor, "backlog": _backlog, "gateway": _gateway,
    "peer": _peer,
}
