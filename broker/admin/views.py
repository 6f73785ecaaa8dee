"""Admin routes for health, metrics, status, nodes, queues and policy.

Reads are answered from the live hub; the three node mutations and the policy reload go through
the hub's and the server's own seams and each writes an ``admin`` audit entry naming the token
and the outcome (refusals included) before the answer is sent.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from broker import canonical, router
from broker.admin.app import CONTEXT, AdminContext, ApiError, requires, token_of
from broker.audit.leaves import AdminEntry
from broker.delivery import RecipientQueue
from broker.errors import BrokerError, ProtocolError
from broker.metrics import PRECEDENCE_NAMES
from policies.bundle import Bundle, document_hash
from policies.decide import decide
from policies.model import Label, NodeCert

#: The transitions an operator may make, by action: the statuses it may start from.
TRANSITIONS = {
    "suspend": ("suspended", ("active",)),
    "resume": ("active", ("suspended",)),
    "revoke": ("revoked", ("active", "suspended")),
}


def register(routes: web.UrlDispatcher) -> None:
    routes.add_get("/healthz", healthz)
    routes.add_get("/readyz", readyz)
    routes.add_get("/metrics", metrics)
    routes.add_get("/v1/status", status)
    routes.add_get("/v1/nodes", nodes)
    routes.add_get("/v1/nodes/{node}", node_detail)
    for action in TRANSITIONS:
        routes.add_post(f"/v1/nodes/{{node}}/{action}", node_action)
    routes.add_get("/v1/queues", queues)
    routes.add_get("/v1/policy", policy)
    routes.add_get("/v1/policy/documents", policy_documents)
    routes.add_post("/v1/policy/decide", policy_decide)
    routes.add_post("/v1/policy/reload", policy_reload)


def _ctx(request: web.Request) -> AdminContext:
    return request.app[CONTEXT]


# --- health and metrics ---------------------------------------------------------------------


@requires(None)
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


@requires(None)
async def readyz(request: web.Request) -> web.Response:
    """Readiness: listening, the audit log accepting and not stalled, the store with room."""
    reason = not_ready_reason(_ctx(request))
    if reason is not None:
        raise ApiError(503, "not_ready", reason)
    return web.json_response({"status": "ready"})


def not_ready_reason(ctx: AdminContext) -> str | None:
    broker = ctx.broker
    if not broker.ready.is_set():
        return "the node listener is not up"
    if broker.audit.failed is not None:
        return f"the audit log stopped: {broker.audit.failed.reason}"
    stalled = broker.audit.stalled_reason()
    if stalled is not None:
        return stalled
    capacity = broker.hub.capacity
    return capacity.check() if capacity is not None else None


@requires("read")
async def metrics(request: web.Request) -> web.Response:
    body = _ctx(request).broker.hub.metrics.exposition()
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Version": "0.0.4"})


# --- status and nodes -----------------------------------------------------------------------


@requires("read")
async def status(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    broker, hub = ctx.broker, ctx.broker.hub
    latest, not_ready = broker.audit.latest, not_ready_reason(ctx)
    return web.json_response({
        "broker": broker.name, "url": broker.url, "bundle": hub.bundle.hash.hex(),
        "uptime_s": round(time.monotonic() - ctx.started, 3),
        "ready": not_ready is None, "not_ready": not_ready,
        "audit": {"size": broker.audit.size, "checkpoint": latest.size if latest else None},
        "connections": len(hub.peers), "nodes": len(hub.bundle.nodes),
        "queued": sum(q.depth for q in hub.queues.values()),
    })


def node_status(ctx: AdminContext, cert: NodeCert) -> str:
    """``revoked`` (by an operator, or the certificate by its nation), ``suspended``,
    ``expired`` (certificate outside its window) or ``active``."""
    hub = ctx.broker.hub
    if cert.node in hub.statuses:
        return hub.statuses[cert.node]
    if hub.bundle.revocation_of(cert) is not None:
        return "revoked"
    if not cert.is_valid_at(hub.clock_ms()):
        return "expired"
    return "active"


def _queue_view(queue: RecipientQueue | None, now: int) -> dict[str, Any]:
    if queue is None:
        return {"depth": 0, "in_flight": 0, "bytes": 0, "by_precedence": {},
                "oldest_age_s": {}}
    return {
        "depth": queue.depth, "in_flight": queue.in_flight, "bytes": queue.bytes,
        "by_precedence": {PRECEDENCE_NAMES[p]: n
                          for p, n in sorted(queue.depth_by_precedence().items())},
        "oldest_age_s": {PRECEDENCE_NAMES[p]: max(0, now - ms) / 1000
                         for p, ms in sorted(queue.oldest_by_precedence().items())},
    }


def _node_summary(ctx: AdminContext, cert: NodeCert) -> dict[str, Any]:
    hub = ctx.broker.hub
    queue = hub.queues.get(cert.node)
    return {"node": cert.node, "nation": cert.nation, "status": node_status(ctx, cert),
            "online": cert.node in hub.peers, "queue_depth": queue.depth if queue else 0}


@requires("read")
async def nodes(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    certs = sorted(ctx.broker.hub.bundle.nodes.values(), key=lambda c: c.node)
    return web.json_response({"nodes": [_node_summary(ctx, c) for c in certs]})


def _cert_of(ctx: AdminContext, node: str) -> NodeCert:
    cert = ctx.broker.hub.bundle.nodes.get(node)
    if cert is None:
        raise ApiError(404, "not_found", f"no node {node!r} in the active bundle")
    return cert


@requires("read")
async def node_detail(request: web.Request) -> web.Response:
    ctx = _ctx(request)
    cert = _cert_of(ctx, request.match_info["node"])
    hub = ctx.broker.hub
    return web.json_response({
        **_node_summary(ctx, cert),
        "accreditation": {"max": cert.accreditation.max,
                          "cats": {k: list(v) for k, v in
                                   sorted(cert.accreditation.cats.items())}},
        "not_before_ms": cert.not_before, "not_after_ms": cert.not_after,
        "subscriptions": sorted(hub.subscriptions.get(cert.node, ())),
        "queue": _queue_view(hub.queues.get(cert.node), hub.clock_ms()),
    })


@requires("operate")
async def node_action(request: web.Request) -> web.Response:
    """Suspend, resume or revoke a node; the answer waits for the durable ``admin`` entry."""
    ctx, token = _ctx(request), token_of(request)
    node, action = request.match_info["node"], request.path.rsplit("/", 1)[1]
    target, allowed_from = TRANSITIONS[action]
    hub = ctx.broker.hub
    cert = hub.bundle.nodes.get(node)
    current = node_status(ctx, cert) if cert is not None else None
    if current == "expired":
        current = "active"  # an expired certificate is refused anyway; the status still counts
    if cert is None or current not in allowed_from:
        status, error, detail = (
            (404, "not_found", f"no node {node!r} in the active bundle") if cert is None else
            (409, "conflict", f"{node} is {current}; {action} applies to a node that is "
                              f"{' or '.join(allowed_from)}"))
        await _record(ctx, AdminEntry(ts=hub.clock_ms(), operator=token.name, action=action,
                                      target=node[:128], outcome=f"refused:{error}"))
        hub.metrics.admin_actions.labels(action, "refused").inc()
        raise ApiError(status, error, detail)
    index = await hub.set_status(node, target, operator=token.name)
    hub.metrics.admin_actions.labels(action, "ok").inc()
    return web.json_response({"node": node, "status": target, "audit": index})


async def _record(ctx: AdminContext, entry: AdminEntry) -> int:
    return await ctx.broker.audit.append(entry)


# --- queues ---------------------------------------------------------------------------------


@requires("read")
async def queues(request: web.Request) -> web.Response:
    hub = _ctx(request).broker.hub
    now = hub.clock_ms()
    listed = [{"node": node, **_queue_view(queue, now)}
              for node, queue in sorted(hub.queues.items()) if queue.depth]
    return web.json_response({"queues": listed, "total": sum(q["depth"] for q in listed)})


# --- policy ---------------------------------------------------------------------------------


def _describe_bundle(bundle: Bundle, now: int) -> dict[str, Any]:
    root = bundle.trust_root
    return {
        "bundle": bundle.hash.hex(),
        "trust_root": {"version": root.version, "threshold": root.threshold,
                       "witness_quorum": root.witness_quorum, "nations": sorted(root.nations),
                       "communities": {k: list(v) for k, v in sorted(root.communities.items())},
                       "brokers": [b.name for b in root.brokers]},
        "schemes": sorted(bundle.schemes),
        "agreements": [{"id": a.id, "version": a.version, "parties": list(a.parties),
                        "not_before_ms": a.not_before, "not_after_ms": a.not_after,
                        "active": a.is_active_at(now), "tiers": [t.name for t in a.tiers]}
                       for a in bundle.agreements],
        "nodes": len(bundle.nodes),
    }


@requires("read")
async def policy(request: web.Request) -> web.Response:
    hub = _ctx(request).broker.hub
    return web.json_response(_describe_bundle(hub.bundle, hub.clock_ms()))


@requires("read")
async def policy_documents(request: web.Request) -> web.Response:
    bundle = _ctx(request).broker.hub.bundle
    return web.json_response({"bundle": bundle.hash.hex(), "documents": [
        {"name": name, "sha256": document_hash(doc).hex(),
         "text": doc.data.decode("utf-8", errors="replace")}
        for name, doc in sorted(bundle.documents.items())]})


@requires("read")
async def policy_decide(request: web.Request) -> web.Response:
    """The release decision for one label, sender, recipient and topic, with every reason."""
    hub = _ctx(request).broker.hub
    body = await _json_object(request)
    try:
        label = Label.from_map(_canonical_label(body.get("label")))
        topic = router.validate_topic(_string(body, "topic"))
        sender = hub.bundle.nodes.get(_string(body, "sender"))
        recipient = hub.bundle.nodes.get(_string(body, "recipient"))
    except (ProtocolError, TypeError, ValueError) as exc:
        raise ApiError(400, "bad_request", str(exc)) from None
    if sender is None or recipient is None:
        raise ApiError(404, "not_found", "sender and recipient must be nodes of the bundle")
    at = body.get("at_ms", hub.clock_ms())
    if isinstance(at, bool) or not isinstance(at, int) or not 0 <= at < 1 << 62:
        raise ApiError(400, "bad_request", "at_ms must be a non-negative integer")
    decision = decide(label, sender, recipient, topic, at, hub.bundle,
                      inactive_nodes=hub.inactive)
    return web.json_response({"permit": decision.permit, "status": decision.status(),
                              "reasons": list(decision.reasons), "via": decision.via,
                              "bundle": hub.bundle.hash.hex(), "at_ms": at})


@requires("operate")
async def policy_reload(request: web.Request) -> web.Response:
    """Load the policy directory again; a refused bundle changes nothing (422)."""
    ctx, token = _ctx(request), token_of(request)
    hub = ctx.broker.hub
    if ctx.reload is None:
        raise ApiError(409, "conflict", "this broker was not started from a configuration")
    before = hub.bundle.hash
    try:
        bundle = await ctx.reload()
    except BrokerError as exc:
        await _record(ctx, AdminEntry(ts=hub.clock_ms(), operator=token.name, action="reload",
                                      target=before.hex(), outcome=f"refused:{exc.code}"))
        hub.metrics.admin_actions.labels("reload", "refused").inc()
        raise ApiError(422, exc.code, exc.reason) from None
    index = await _record(ctx, AdminEntry(ts=hub.clock_ms(), operator=token.name,
                                          action="reload", target=bundle.hash.hex(),
                                          outcome="ok" if bundle.hash != before else "unchanged"))
    hub.metrics.admin_actions.labels("reload", "ok").inc()
    return web.json_response({"bundle": bundle.hash.hex(), "changed": bundle.hash != before,
                              "audit": index})


# --- request bodies -------------------------------------------------------------------------


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, LookupError, RecursionError):  # bad JSON, charset, or nesting
        raise ApiError(400, "bad_request", "the body must be JSON (UTF-8, not too deep)") \
            from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string")
    return value


def _canonical_label(value: Any) -> dict[str, Any]:
    """A label from JSON: lists become the canonical (sorted, unique) sets labels hold."""
    if not isinstance(value, dict):
        raise ValueError("label must be an object")
    out = dict(value)
    if isinstance(out.get("rel"), list) and all(isinstance(v, str) for v in out["rel"]):
        out["rel"] = canonical.canonical_set(out["rel"])
    if isinstance(out.get("cats"), dict):
        out["cats"] = {k: canonical.canonical_set(v)
                       if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
                       for k, v in out["cats"].items()}
    return out
