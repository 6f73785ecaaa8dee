"""``broker.child``: what the verify workers and the store's writer process share.

Pinned down: ``spawn`` starts ``python -m MODULE FD ARGS`` with the child's end of the socket
as ``FD``, in a process group of its own, stdin and stdout on ``/dev/null``, and closes the
parent's copy of that end whether the start works or fails (never the caller's end);
``ignore_stop_signals`` keeps a child alive through ``SIGINT``, ``SIGTERM`` and ``SIGHUP``;
``exited`` reports an exit (reaped) without waiting for the deadline, gives up at the deadline
with the child still running, and lets the loop run meanwhile; ``kill`` ends a child with
``SIGKILL`` and reaps it, and is harmless on one already gone. Real children, each bounded:
any still running at the end of a test is killed; timing bounds are loose.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker import child

ROOT = Path(__file__).resolve().parents[2]
GUARD = 20.0  # a test still running after this long has hung
SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]
QUICK = [sys.executable, "-c", "pass"]

Start = Callable[[list[str]], subprocess.Popen[bytes]]


@pytest.fixture
def start() -> Iterator[Start]:
    """Start a child (cwd: the repository, so that it can import ``broker``); killed at the
    end if still running."""
    started: list[subprocess.Popen[bytes]] = []

    def run(argv: list[str]) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL)
        started.append(process)
        return process

    yield run
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


# --- spawn -----------------------------------------------------------------------------------

REPORTER = textwrap.dedent("""\
    import os, socket, sys
    def devnull(fd):
        return os.path.samestat(os.fstat(fd), os.stat(os.devnull))
    with socket.socket(fileno=int(sys.argv[1])) as sock:
        facts = [str(os.getpgid(0) == os.getpid()), str(devnull(0)), str(devnull(1))]
        sock.sendall("|".join(facts + sys.argv[2:]).encode())
    """)


def test_spawn_hands_the_child_its_socket_and_arguments(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "reporter_child.py").write_text(REPORTER)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    ours, theirs = socket.socketpair()
    with ours:
        process = child.spawn("reporter_child", theirs, "one", "two words")
        try:
            assert theirs.fileno() == -1  # the parent's copy: only the child holds that end
            ours.settimeout(GUARD)
            received = b""
            while chunk := ours.recv(4096):  # until the child's end closes
                received += chunk
            assert process.wait(GUARD) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    own_group, stdin_null, stdout_null, *args = received.decode().split("|")
    assert (own_group, stdin_null, stdout_null) == ("True", "True", "True")
    assert args == ["one", "two words"]


def test_spawn_closes_the_childs_end_when_the_start_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    ours, theirs = socket.socketpair()
    with ours:
        with pytest.raises(OSError):
            child.spawn("broker.verifier", theirs)
        assert theirs.fileno() == -1
        assert ours.fileno() != -1  # the caller's end is the caller's to close


# --- ignore_stop_signals ---------------------------------------------------------------------

def test_a_child_that_ignores_the_stop_signals_lives_through_them() -> None:
    code = textwrap.dedent("""\
        import os, signal
        from broker.child import ignore_stop_signals
        ignore_stop_signals()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            os.kill(os.getpid(), sig)
        print("alive")
        """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          timeout=GUARD, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"alive\n", b"")


def test_the_stop_signals_are_the_service_managers() -> None:
    assert set(child.STOP_SIGNALS) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


# --- exited ----------------------------------------------------------------------------------

async def test_exited_sees_an_exit_before_the_deadline(start: Start) -> None:
    process = start(QUICK)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with asyncio.timeout(GUARD):
        assert await child.exited(process, began + 60)
    assert loop.time() - began < GUARD  # it did not wait for the deadline
    assert process.returncode == 0  # reaped


async def test_exited_gives_up_at_the_deadline_and_the_loop_goes_on(start: Start) -> None:
    process = start(SLEEPER)
    loop = asyncio.get_running_loop()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    began = loop.time()
    try:
        async with asyncio.timeout(GUARD):
            assert not await child.exited(process, began + 0.3)
    finally:
        ticker.cancel()
    assert 0.29 <= loop.time() - began < GUARD
    assert process.poll() is None  # still running: only the caller kills it
    assert ticks >= 5  # the loop ran while it waited


async def test_exited_at_a_past_deadline_answers_at_once(start: Start) -> None:
    process = start(SLEEPER)
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert not await child.exited(process, began - 1)
    assert loop.time() - began < 1.0


# --- kill ------------------------------------------------------------------------------------

async def test_kill_ends_a_child_with_sigkill_and_reaps_it(start: Start) -> None:
    process = start(SLEEPER)
    async with asyncio.timeout(GUARD):
        await child.kill(process)
    assert process.returncode == -signal.SIGKILL


async def test_kill_of_a_child_already_gone_is_harmless(start: Start) -> None:
    process = start(QUICK)
    assert process.wait(GUARD) == 0
    async with asyncio.timeout(GUARD):
        await child.kill(process)
    assert process.returncode == 0
