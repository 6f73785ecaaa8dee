"""Child processes that serve the broker over a socket: what the verify workers
(:mod:`broker.verifier`) and the store's writer process (:mod:`broker.store.writer_process`)
share.

A child is ``python -m MODULE FD ...``: its end of a socket pair is inherited as ``FD``, and it
exits when it reads the end of that socket, so it never outlives the broker for long, also after
a ``SIGKILL``. It runs in its own process group (a terminal's Ctrl-C does not reach it) and
ignores the signals a service manager sends to the whole control group: stopping it is the
broker's call, made after its orderly stop has used it. What a caller raises when a start
fails, and how it reaps what it killed, stay the caller's.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys

#: What a terminal sends to its foreground process group and a service manager to a whole
#: control group: the broker's to act on (stop, reload), not its children's.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: How often :func:`exited` looks whether a child has gone.
POLL_S = 0.005


def spawn(module: str, theirs: socket.socket, *args: str) -> subprocess.Popen[bytes]:
    """Start ``python -m module FD *args``, ``FD`` being ``theirs`` (the child's end of a socket
    pair), in a process group of its own. ``theirs`` is closed here whatever happens (the child
    has its own copy); the caller's end is the caller's. Raises what ``Popen`` raises."""
    try:
        return subprocess.Popen(
            [sys.executable, "-m", module, str(theirs.fileno()), *args],
            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            # Its own process group: a terminal's Ctrl-C does not reach it even before
            # it ignores SIGINT (the broker stops it).
            process_group=0)
    finally:
        theirs.close()


def ignore_stop_signals() -> None:
    """In the child, first thing: ignore :data:`STOP_SIGNALS` (it exits when its socket
    closes)."""
    for ignored in STOP_SIGNALS:
        signal.signal(ignored, signal.SIG_IGN)


async def exited(process: subprocess.Popen[bytes], deadline: float) -> bool:
    """Whether ``process`` has exited (and is reaped) by ``deadline``, a time on the running
    loop's clock (one deadline can be shared by several children). It is looked at every
    :data:`POLL_S`: the loop goes on meanwhile."""
    loop = asyncio.get_running_loop()
    while process.poll() is None and loop.time() < deadline:
        await asyncio.sleep(POLL_S)
    return process.poll() is not None


async def kill(process: subprocess.Popen[bytes]) -> None:
    """Kill ``process`` and wait for it to exit (in a thread: the loop goes on), so that it
    is reaped. Nothing happens to one already gone: ``Popen.kill`` neither signals a process
    it has reaped nor raises for one that exited meanwhile."""
    process.kill()
    await asyncio.to_thread(process.wait)
