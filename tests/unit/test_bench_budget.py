"""The machine's budget (broker/bench/budget.py): the bound on any broker's message rate from
the parts measured in the same run, and no bound when a part was not measured."""

from __future__ import annotations

import io

import pytest

from broker.bench import report
from broker.bench.budget import budget

LIMITS = {"ed25519_verify_per_s": 12_500.0, "audit_cpu_us_per_message": 100.0,
          "relay_cpu_us_per_message": 40.0, "relay_load_cpu_us_per_message": 60.0}


def test_the_bound_spreads_the_parts_over_every_core() -> None:
    result = budget(LIMITS, cores=2)
    assert result is not None
    # verify 1e6 / 12,500 = 80 µs; 80 + 100 + 40 + 60 = 280 µs per message on two cores.
    assert result["parts_us_per_message"] == {"verify": 80.0, "audit": 100.0, "frames": 40.0,
                                              "load": 60.0}
    assert result["total_us_per_message"] == 280.0
    assert result["bound_messages_per_s"] == pytest.approx(2e6 / 280, abs=0.1)
    assert result["bound_vs_verify"] == pytest.approx(2e6 / 280 / 12_500, abs=1e-4)
    assert budget(LIMITS, cores=4)["bound_messages_per_s"] == pytest.approx(4e6 / 280, abs=0.1)


@pytest.mark.parametrize("missing", sorted(LIMITS))
def test_no_bound_without_every_part(missing: str) -> None:
    assert budget({k: v for k, v in LIMITS.items() if k != missing}, cores=2) is None
    assert budget({**LIMITS, missing: 0.0}, cores=2) is None  # below the clock's tick
    assert budget({**LIMITS, missing: None}, cores=2) is None


def test_the_limits_table_prints_the_budget_or_says_why_not() -> None:
    limits = {"status": "ok", "envelope_bytes": 1024, "ws_echo_bytes": 1024,
              "ws_echo_window": 64, "unpack_verify_hash_per_s": 7000.0,
              "ws_echo_per_s": 50_000.0, "relay_per_s": 17_000.0, **LIMITS}
    out = io.StringIO()
    report.print_scenario("limits", {**limits, "budget": budget(limits, cores=2)}, out)
    assert "the machine's budget (2 cores" in out.getvalue()
    assert "7,143" in out.getvalue()  # the bound, msg/s
    out = io.StringIO()
    report.print_scenario("limits", {**limits, "budget": None}, out)
    assert "the machine's budget: not measured" in out.getvalue()
