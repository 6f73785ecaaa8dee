"""The broker's configurable limits, and the size limits of envelopes and ``route`` frames
(pure: no I/O).

:class:`Limits` gathers every limit of the node listener (``[limits]`` of the configuration,
see :func:`limits_from_section`). :func:`check_envelope_limits` and :func:`check_route_limits`
raise :class:`ProtocolError` ``too_large`` with a reason naming the limit; the hub calls them
first, so a refused envelope is neither routed nor audited, and the connection survives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from broker import canonical, wire
from broker.capacity import StoreLimits
from broker.config import NODE_RATE_KEYS, LimitsSection, NodeRate
from broker.envelope import MAX_RECIPIENTS, Envelope
from broker.errors import BrokerError, ProtocolError
from broker.guard import ConnectionLimits
from broker.ratelimit import RateLimits
from broker.router import MAX_TOPIC_BYTES


@dataclasses.dataclass(frozen=True)
class EnvelopeLimits:
    """Sizes of the parts of an envelope (and of a ``route`` frame) the broker accepts."""

    #: UTF-8 bytes of the topic (the contract's own bound is 255).
    max_topic_bytes: int = MAX_TOPIC_BYTES
    #: Canonical msgpack bytes of the label.
    max_label_bytes: int = 4096
    #: Explicit recipients (``to``).
    max_to: int = 256
    #: Sealed content keys (``enc.keys``; the envelope format's own bound is 1024).
    max_keys: int = MAX_RECIPIENTS


def check_envelope_limits(env: Envelope, limits: EnvelopeLimits) -> None:
    """Raise ``too_large`` (with ``ref`` = the envelope id) if a part of ``env`` is over its
    limit."""
    problem = (_topic_problem(env.topic, limits) or _to_problem(env.to, limits)
               or _label_problem(len(env.label_bytes), limits))
    if problem is None and len(env.keys) > limits.max_keys:
        problem = f"enc.keys has {len(env.keys)} entries (limits.max_keys_entries is " \
                  f"{limits.max_keys})"
    if problem is not None:
        raise ProtocolError(f"envelope {problem}", code="too_large", ref=env.id)


def check_route_limits(frame: wire.Route, limits: EnvelopeLimits) -> None:
    """Raise ``too_large`` if the topic, ``to`` or label of a ``route`` frame is over its
    limit."""
    try:
        label_size = len(canonical.encode(dict(frame.label)))
    except (BrokerError, TypeError, ValueError):
        label_size = 0  # not encodable: the hub answers invalid_label for it
    problem = (_topic_problem(frame.topic, limits) or _to_problem(frame.to or (), limits)
               or _label_problem(label_size, limits))
    if problem is not None:
        raise ProtocolError(f"route {problem}", code="too_large")


def _topic_problem(topic: str, limits: EnvelopeLimits) -> str | None:
    size = len(topic.encode("utf-8", "surrogatepass"))
    if size > limits.max_topic_bytes:
        return f"topic is {size} bytes (limits.max_topic_bytes is {limits.max_topic_bytes})"
    return None


def _to_problem(to: tuple[str, ...], limits: EnvelopeLimits) -> str | None:
    if len(to) > limits.max_to:
        return f"'to' has {len(to)} entries (limits.max_to_entries is {limits.max_to})"
    return None


def _label_problem(size: int, limits: EnvelopeLimits) -> str | None:
    if size > limits.max_label_bytes:
        return f"label is {size} bytes (limits.max_label_bytes is {limits.max_label_bytes})"
    return None


@dataclasses.dataclass(frozen=True)
class Limits:
    """Every limit of the node listener (defaults = the configuration's defaults)."""

    max_frame_bytes: int = 1 << 20
    clock_skew_ms: int = 5 * 60 * 1000
    delivery_window: int = 64
    handshake_timeout_s: float = 10.0
    #: Frames waiting to be written to one connection; a peer that stops reading while still
    #: sending requests is disconnected (``rate_limited``) instead of growing broker memory.
    max_outbound_frames: int = 1024
    max_subscriptions_per_node: int = 1024
    #: Envelope bytes owed to one node (queued or in flight) before publishes to it are refused.
    max_queued_bytes_per_node: int = 256 << 20
    #: Envelope bytes of one node's queue kept in memory; the copies beyond are read from the
    #: store when they are sent (a backlog costs memory per copy, not per byte).
    queue_memory_bytes_per_node: int = 1 << 20
    store: StoreLimits = dataclasses.field(default_factory=StoreLimits)
    #: How often queues are swept for messages past their TTL.
    expiry_interval_s: float = 1.0
    #: An authenticated connection that sends nothing (no frame, no WebSocket ping) for this
    #: long is closed (WebSocket 1001, reason ``idle_timeout``).
    idle_timeout_s: float = 120.0
    #: Time to send a complete HTTP request head (the WebSocket upgrade request; any admin
    #: request, and an admin request's body after it), and the idle time between keep-alive
    #: requests, on both listeners.
    request_timeout_s: float = 10.0
    #: A connection (either listener) whose output cannot make progress for this long — its
    #: peer does not read — is aborted.
    write_stall_timeout_s: float = 30.0
    rate: RateLimits = dataclasses.field(default_factory=RateLimits)
    #: Nodes with rates of their own (busy gateways), in force once they have authenticated.
    node_rates: Mapping[str, RateLimits] = dataclasses.field(default_factory=dict)
    connections: ConnectionLimits = dataclasses.field(default_factory=ConnectionLimits)
    envelope: EnvelopeLimits = dataclasses.field(default_factory=EnvelopeLimits)


    def rate_of(self, node: str) -> RateLimits:
        """The rates of an authenticated connection of ``node``."""
        return self.node_rates.get(node, self.rate)


def limits_from_section(section: LimitsSection) -> Limits:
    """The limits a validated ``[limits]`` section sets."""
    rate = RateLimits(frames_per_second=float(section.frames_per_second),
                      frames_burst=section.frames_burst,
                      bytes_per_second=float(section.bytes_per_second),
                      bytes_burst=section.bytes_burst,
                      max_throttle_s=float(section.max_throttle_seconds))
    return Limits(
        max_frame_bytes=section.max_frame_bytes,
        clock_skew_ms=section.clock_skew_seconds * 1000,
        delivery_window=section.delivery_window,
        handshake_timeout_s=float(section.handshake_timeout_seconds),
        max_outbound_frames=section.max_outbound_frames,
        max_subscriptions_per_node=section.max_subscriptions_per_node,
        max_queued_bytes_per_node=section.max_queued_bytes_per_node,
        queue_memory_bytes_per_node=section.queue_memory_bytes_per_node,
        store=StoreLimits(max_store_bytes=section.max_store_bytes,
                          min_free_bytes=section.min_free_disk_bytes),
        expiry_interval_s=section.expiry_interval_ms / 1000,
        idle_timeout_s=float(section.idle_timeout_seconds),
        request_timeout_s=float(section.request_timeout_seconds),
        write_stall_timeout_s=float(section.write_stall_timeout_seconds),
        rate=rate,
        node_rates={own.node: _own_rates(rate, own) for own in section.node_rates},
        connections=ConnectionLimits(
            max_connections=section.max_connections,
            max_unauthenticated_per_address=section.max_unauthenticated_per_address,
            node_connects_per_minute=section.node_connects_per_minute,
            auth_backoff_free_failures=section.auth_backoff_free_failures,
            auth_backoff_initial_s=float(section.auth_backoff_initial_seconds),
            auth_backoff_max_s=float(section.auth_backoff_max_seconds),
            auth_backoff_table_size=section.auth_backoff_table_size),
        envelope=EnvelopeLimits(max_topic_bytes=section.max_topic_bytes,
                                max_label_bytes=section.max_label_bytes,
                                max_to=section.max_to_entries,
                                max_keys=section.max_keys_entries),
    )


def _own_rates(default: RateLimits, own: NodeRate) -> RateLimits:
    """``default`` with the rates ``own`` sets (the throttling bound stays the listener's)."""
    set_here = {key: getattr(own, key) for key in NODE_RATE_KEYS if getattr(own, key) is not None}
    return dataclasses.replace(default, **set_here)
