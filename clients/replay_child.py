"""A worker process of the auditor: decides the runs of entries it is sent
(:mod:`clients.replay_workers` is the auditor's side, and says why).

``python -m clients.replay_child FD``: length-prefixed msgpack over the socket ``FD``. First
``["bundles", [[hash, content], ...]]``: it rebuilds each bundle from its signed documents and
says ``["ready", [hash, ...]]``; then it answers each ``[number, suspended, revoked, [index,
entry, index, entry, ...]]`` with ``[number, steps]`` (:func:`clients.replay.decide_steps`). It
exits when the socket closes. It imports only what deciding needs, to start fast.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
from collections.abc import Sequence
from typing import Any

import msgpack

from clients.replay import Suspensions, decide_steps
from policies.bundle import TRUST_ROOT, Bundle, build_bundle, document_hash, documents_from_content
from policies.cache import DecisionCache

_LENGTH = struct.Struct(">I")
#: The largest message either end reads. The auditor's runs stop after 32 MiB of entries (one
#: entry is at most 4 MiB, broker.audit.leaves); the steps of a run are usually far smaller than
#: its entries, but not always (a route entry's problems name each decision that differs): an
#: answer over this is refused, the worker dropped, and the rest decided in line.
MAX_MESSAGE = 64 << 20


def send(sock: socket.socket, message: Any) -> None:
    data = msgpack.packb(message, use_bin_type=True)
    sock.sendall(_LENGTH.pack(len(data)) + data)


def _receive_exactly(sock: socket.socket, count: int) -> bytes:
    parts, left = [], count
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            raise EOFError("the socket closed")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def receive(sock: socket.socket) -> Any:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    if length > MAX_MESSAGE:
        raise ValueError(f"a message of {length} bytes")
    return msgpack.unpackb(_receive_exactly(sock, length), raw=False, use_list=True)


def _bundles_from(contents: Sequence[Any]) -> dict[bytes, Bundle]:
    bundles = {}
    for digest, content in contents:
        documents = documents_from_content(content)
        bundle = build_bundle(documents, pinned_root_sha256=document_hash(documents[TRUST_ROOT]))
        if bundle.hash == digest:
            bundles[digest] = bundle
    return bundles


def serve(sock: socket.socket) -> None:
    """Answer the auditor on ``sock`` until it closes."""
    hello = receive(sock)
    bundles = _bundles_from(hello[1]) if hello[0] == "bundles" else {}
    send(sock, ["ready", sorted(bundles)])
    cache = DecisionCache(max_entries=1 << 16)
    while True:
        try:
            number, suspended, revoked, flat = receive(sock)
        except EOFError:
            return
        run = list(zip(flat[::2], flat[1::2], strict=True))
        send(sock, [number, decide_steps(run, bundles, cache, Suspensions(suspended, revoked))])


def main(argv: Sequence[str]) -> int:
    with socket.socket(fileno=int(argv[0])) as sock, contextlib.suppress(OSError):
        serve(sock)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
