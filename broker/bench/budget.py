"""The machine's budget: the highest message rate any broker could reach here that does the
work every publish of the throughput plan must do, measured in parts in the same run. Pure:
the limits' figures in, the bound out.

The parts, in CPU microseconds per message (all measured by :mod:`broker.bench.limits`):

- **verify**: one Ed25519 signature check (``1e6 / ed25519_verify_per_s``; one core, so CPU
  time equals wall time);
- **audit**: the production audit log writing the plan's three entries per message (a ``route``
  entry with three candidates, two ``deliver`` entries) durably: encoding, Merkle hashing,
  SQLite rows and commits, in the large batches that are its cheapest case
  (:func:`broker.bench_audit.audit_cpu_per_message`);
- **frames**: the relay's CPU per message: reading the ``pub``, writing the receipt and the two
  ``deliver`` frames, reading the acks, routing by label audience — no checks, no disk
  (``relay_cpu_us_per_message``);
- **load**: the load generators' CPU per message, measured during the relay run
  (``relay_load_cpu_us_per_message``): they share the machine with the broker.

The bound spreads their sum over every core with nothing lost to hand-offs, locks or waiting:
``cores × 1e6 / (verify + audit + frames + load)`` messages per second. What a broker does
beyond these parts — the strict canonical parse, decisions, queue and message rows, delivery
windows, acks, the GIL — only lowers it. So a goal above ``bound ÷ verify`` cannot be met on
this machine by a broker that does the same work durably, in this implementation of its parts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: The parts, in order: name, the limits' key, and how to turn its value into µs per message.
PARTS: tuple[tuple[str, str, bool], ...] = (
    ("verify", "ed25519_verify_per_s", True),  # a rate: 1e6 / rate
    ("audit", "audit_cpu_us_per_message", False),
    ("frames", "relay_cpu_us_per_message", False),
    ("load", "relay_load_cpu_us_per_message", False),
)


def budget(limits: Mapping[str, Any], cores: int) -> dict[str, Any] | None:
    """The parts (µs per message), their sum and the bound, or ``None`` when a part was not
    measured (or measured as nothing: a quick run's CPU can fall below the kernel's tick)."""
    parts: dict[str, float] = {}
    for name, key, is_rate in PARTS:
        value = limits.get(key)
        if not isinstance(value, (int, float)) or value <= 0 or cores < 1:
            return None
        parts[name] = 1e6 / value if is_rate else float(value)
    total = sum(parts.values())
    bound = cores * 1e6 / total
    return {
        "cores": cores,
        "parts_us_per_message": {name: round(us, 1) for name, us in parts.items()},
        "total_us_per_message": round(total, 1),
        "bound_messages_per_s": round(bound, 1),
        "bound_vs_verify": round(bound / limits["ed25519_verify_per_s"], 4),
    }
