"""One gateway client per state directory: a second one is refused, in this process or
another, and the lock goes with its holder (clients/statelock.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.coalition import Coalition
from clients.dedup import SEEN_FILE, StateReadFailed
from clients.gateway import GatewayClient
from clients.statelock import LOCK_FILE, StateInUse, StateLock


def test_a_second_lock_on_the_directory_is_refused_until_the_first_is_released(
        tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = StateLock(state)  # creates the directory
    assert first.held and (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with pytest.raises(StateInUse, match=f"in use by another gateway client \\(pid {os.getpid()}"
                       r"\)") as refused:
        StateLock(state)
    assert refused.value.code == "state_in_use"
    first.release()
    first.release()  # idempotent
    assert not first.held
    StateLock(state).release()


def test_a_lock_held_by_another_process_goes_with_it(tmp_path: Path) -> None:
    state = tmp_path / "state"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from clients.statelock import StateLock; lock = StateLock(Path(sys.argv[1])); "
         "print('held', flush=True); time.sleep(60)", str(state)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(StateInUse, match=f"pid {holder.pid}"):
            StateLock(state)
        holder.kill()  # however it ends, the kernel drops its lock
        holder.wait(10)
        deadline = time.monotonic() + 10
        while True:
            try:
                StateLock(state).release()
                break
            except StateInUse:
                assert time.monotonic() < deadline
                time.sleep(0.01)
    finally:
        holder.kill()
        holder.wait(10)


def _client(coalition: Coalition, state: Path) -> GatewayClient:
    return GatewayClient("ws://127.0.0.1:9/v1/node", coalition.nodes["GBR-GW1"],
                         coalition.trust_root, broker_name=coalition.broker_name,
                         state_dir=state)


async def test_a_second_gateway_client_on_a_state_directory_is_refused(
        coalition: Coalition, tmp_path: Path) -> None:
    state = tmp_path / "gbr-state"
    first = _client(coalition, state)
    with pytest.raises(StateInUse):
        _client(coalition, state)
    await first.close()  # never connected: still releases the directory
    second = _client(coalition, state)
    await second.close()


async def test_a_client_that_fails_to_connect_leaves_the_directory_free(
        coalition: Coalition, tmp_path: Path) -> None:
    state = tmp_path / "gbr-state"
    with pytest.raises(OSError):  # nothing listens on the discard port
        async with _client(coalition, state):
            pass
    await _client(coalition, state).close()  # __aexit__ never ran; the lock went all the same


async def test_a_client_whose_state_cannot_be_read_leaves_the_directory_free(
        coalition: Coalition, tmp_path: Path) -> None:
    state = tmp_path / "gbr-state"
    state.mkdir()
    (state / SEEN_FILE).mkdir()  # a directory where the ids file should be: unreadable
    with pytest.raises(StateReadFailed):
        _client(coalition, state)
    (state / SEEN_FILE).rmdir()
    await _client(coalition, state).close()  # the failed one did not keep the lock


def test_a_lock_nobody_holds_any_more_is_released(tmp_path: Path) -> None:
    """A client never closed does not keep its directory for good: its lock goes with it."""
    StateLock(tmp_path / "state")  # dropped at once
    StateLock(tmp_path / "state").release()


def test_a_forked_child_does_not_inherit_the_lock(tmp_path: Path) -> None:
    """A child forked while the lock is held (a gateway that starts a helper process) must not
    keep the directory locked once the parent lets it go."""
    state = tmp_path / "state"
    lock = StateLock(state)
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the child outlives the parent's release, until told to go
        os.close(go_w)
        os.write(ready_w, b"r")  # the fork hooks have run by now
        os.read(go_r, 1)
        os._exit(0)
    os.close(go_r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"r"
        lock.release()
        StateLock(state).release()  # had the child kept a copy of the descriptor: refused
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.close(ready_r)
        os.waitpid(child, 0)
