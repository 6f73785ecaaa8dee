"""Which control answer is whose: the bookkeeping of a link's control channel, pure.

Control answers (``routes``, ``directory``, ``proof``, ``pong``, and an ``error`` without
``ref``) carry no request id (DESIGN, node protocol): the broker answers a node's frames in the
order it sent them, so the client matches answers to requests by order, one request at a time.
That holds only while every answer the broker still owes has someone to take it. A request
given up after it was sent (timed out, cancelled) leaves its answer to come later; so does a
frame sent without waiting (a ``sub`` re-sent when a link comes up, followed by a ``ping``).
:class:`AnswerOrder` counts those owed answers and drops each when it comes, so that the next
request takes its own answer and not a stale one.

A mark *through a pong* means the owed answers end with a ``pong`` (the frames were
followed by a ``ping``): anything before the pong (an ``error`` refusing one of the frames) is
dropped with it; otherwise a mark is one answer of any kind. A mark is *given up* when a
request was abandoned after it was sent: a second of those while the first is still owed
means the broker does not answer in time, or an answer the count expected will not come.

Each link has its own order (:attr:`clients.link.Link.answers`): what is owed on a link that
ended never comes, and must not be dropped from the next.
"""

from __future__ import annotations

import collections

from broker import wire

#: The frames that answer a control request (an ``error`` answers one when it has no ``ref``).
CONTROL_ANSWERS = (wire.Routes, wire.Directory, wire.Proof, wire.Pong, wire.Error)


class AnswerOrder:
    """The control answers owed to nobody on one link, oldest first, and the pongs that were
    somebody's answer (how :meth:`clients.connection.Connection.confirmed` tells whether its
    pong came with an ``error``)."""

    def __init__(self) -> None:
        #: ``(through_pong, given_up)`` per mark, oldest first.
        self._owed: collections.deque[tuple[bool, bool]] = collections.deque()
        #: Pongs taken as a waiting request's answer (not dropped).
        self.pongs = 0

    @property
    def owed(self) -> int:
        """Marks of answers still to come that nobody waits for."""
        return len(self._owed)

    @property
    def given_up(self) -> int:
        """Those marks left by requests given up after they were sent."""
        return sum(given_up for _, given_up in self._owed)

    def owe(self, *, through_pong: bool, given_up: bool = False) -> None:
        """One more answer nobody waits for (``through_pong``: everything through a pong;
        ``given_up``: a request's, abandoned after it was sent)."""
        self._owed.append((through_pong, given_up))

    def clear(self) -> None:
        """Nothing is owed (a new link: the old one's answers will not come)."""
        self._owed.clear()

    def arrived(self, frame: wire.Frame) -> bool:
        """A control answer arrived: ``True`` when it is owed to nobody (drop it), ``False``
        when it is the answer of the request waiting now."""
        if self._owed:
            if not self._owed[0][0] or isinstance(frame, wire.Pong):
                self._owed.popleft()
            return True
        self.pongs += isinstance(frame, wire.Pong)
        return False
