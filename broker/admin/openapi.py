"""The OpenAPI 3.1 document of the admin API, served at ``GET /v1/openapi.json`` (public).

Built from small helpers rather than written out as JSON: :func:`obj` for closed objects (every
property named, all required unless listed as optional), :func:`op` for an operation (it adds
the bearer security, 401 and 403 from the permission the route declares), and shared
components for the ``{error, detail}`` body and the ``X-Request-Id`` header. Response bodies are
closed (``additionalProperties: false``) so that a field a handler adds without documenting it
fails the schemathesis run in ``tests/integration/test_openapi.py``, which also checks that the
router and this document name the same routes with the same permissions.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

from broker.admin.app import requires
from broker.admin.auth import PERMISSIONS
from broker.metrics import PRECEDENCE_NAMES
from broker.router import MAX_TOPIC_BYTES

Schema = dict[str, Any]

OPENAPI_PATH = "/v1/openapi.json"
BEARER = "bearerAuth"
ERROR_REF = {"$ref": "#/components/schemas/Error"}

# --- schema helpers ---------------------------------------------------------------------------

STRING: Schema = {"type": "string"}
NAME: Schema = {"type": "string", "minLength": 1}
BOOL: Schema = {"type": "boolean"}
COUNT: Schema = {"type": "integer", "minimum": 0}
SECONDS: Schema = {"type": "number", "minimum": 0}
MS: Schema = {"type": "integer", "description": "Unix time in milliseconds"}
HEX_SHA256: Schema = {"type": "string", "pattern": "^[0-9a-f]{64}$",
                      "description": "SHA-256, lowercase hex"}
#: The largest integer a query parameter may carry (at most 18 digits).
MAX_QUERY_INT = 10**18 - 1
#: ``at_ms`` of a decision dry-run: below 2**62.
MAX_AT_MS = (1 << 62) - 1
PRECEDENCE = sorted(PRECEDENCE_NAMES.values())


def obj(properties: Mapping[str, Schema], *, optional: Iterable[str] = (),
        description: str | None = None) -> Schema:
    """A closed object: exactly ``properties``, each required unless named in ``optional``."""
    skip = set(optional)
    schema: Schema = {"type": "object", "properties": dict(properties),
                      "required": [name for name in properties if name not in skip],
                      "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def mapping(values: Schema, *, keys: Schema | None = None, description: str | None = None
            ) -> Schema:
    """An object used as a map from (optionally constrained) keys to ``values``."""
    schema: Schema = {"type": "object", "additionalProperties": values}
    if keys is not None:
        schema["propertyNames"] = keys
    if description:
        schema["description"] = description
    return schema


def nullable(schema: Schema) -> Schema:
    return {**schema, "type": [schema["type"], "null"]}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


# --- the body schemas -------------------------------------------------------------------------

QUEUE_FIELDS: dict[str, Schema] = {
    "depth": COUNT, "in_flight": COUNT, "bytes": COUNT,
    "by_precedence": mapping(COUNT, keys={"enum": PRECEDENCE},
                             description="pending messages by precedence"),
    "oldest_age_s": mapping(SECONDS, keys={"enum": PRECEDENCE},
                            description="age of the oldest pending message, by precedence"),
}
NODE_SUMMARY_FIELDS: dict[str, Schema] = {
    "node": NAME, "nation": NAME,
    "status": {"enum": ["active", "suspended", "revoked", "expired"]},
    "online": BOOL, "queue_depth": COUNT,
}
SETS = mapping(array(STRING))

SCHEMAS: dict[str, Schema] = {
    "Error": obj({"error": {"type": "string", "description": "machine-readable code"},
                  "detail": {"type": "string", "description": "what went wrong, for a human"}},
                 description="Every error answer."),
    "Health": obj({"status": {"enum": ["ok"]}}),
    "Ready": obj({"status": {"enum": ["ready"]}}),
    "Status": obj({
        "broker": NAME, "url": {"type": "string", "description": "the node listener"},
        "bundle": HEX_SHA256, "uptime_s": SECONDS, "ready": BOOL,
        "not_ready": nullable({"type": "string", "description": "why not ready"}),
        "audit": obj({"size": COUNT, "checkpoint": nullable(COUNT)}),
        "connections": COUNT, "nodes": COUNT, "queued": COUNT,
    }),
    "Queue": obj(QUEUE_FIELDS),
    "NodeSummary": obj(NODE_SUMMARY_FIELDS),
    "NodeList": obj({"nodes": array(ref("NodeSummary"))}),
    "NodeDetail": obj({
        **NODE_SUMMARY_FIELDS,
        "accreditation": obj({"max": NAME, "cats": SETS}),
        "not_before_ms": MS, "not_after_ms": MS,
        "subscriptions": array(STRING, description="the node's subscription patterns"),
        "queue": ref("Queue"),
    }),
    "NodeAction": obj({"node": NAME, "status": {"enum": ["active", "suspended", "revoked"]},
                       "audit": {**COUNT, "description": "index of the admin audit entry"}}),
    "Queues": obj({"queues": array(obj({"node": NAME, **QUEUE_FIELDS})), "total": COUNT},
                  description="Every node with pending messages."),
    "Policy": obj({
        "bundle": HEX_SHA256,
        "trust_root": obj({"version": COUNT, "threshold": COUNT, "witness_quorum": COUNT,
                           "nations": array(NAME), "communities": SETS,
                           "brokers": array(NAME)}),
        "schemes": array(NAME),
        "agreements": array(obj({"id": NAME, "version": COUNT, "parties": array(NAME),
                                 "not_before_ms": MS, "not_after_ms": MS, "active": BOOL,
                                 "tiers": array(STRING)})),
        "nodes": COUNT,
    }),
    "PolicyDocuments": obj({"bundle": HEX_SHA256, "documents": array(obj({
        "name": NAME, "sha256": HEX_SHA256,
        "text": {"type": "string", "description": "the signed document (TOML or signature)"},
    }))}),
    "DecideRequest": {
        "type": "object",
        "required": ["label", "sender", "recipient", "topic"],
        "properties": {
            "label": {
                "type": "object", "required": ["policy", "class", "orig", "rel"],
                "additionalProperties": False,
                "properties": {
                    "policy": NAME, "class": NAME, "orig": NAME,
                    "rel": array(NAME, description="audience (nations, communities)"),
                    "cats": mapping(array(NAME), keys=NAME),
                },
            },
            "sender": NAME, "recipient": NAME,
            "topic": {"type": "string", "pattern": r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$",
                      "maxLength": MAX_TOPIC_BYTES},
            "at_ms": {"type": "integer", "minimum": 0, "maximum": MAX_AT_MS,
                      "description": "decision time (default: now)"},
        },
    },
    "Decision": obj({
        "permit": BOOL,
        "status": {"type": "string", "description": "permit or deny:<reason>[,<reason>…]"},
        "reasons": array(STRING), "via": nullable({"type": "string"}),
        "bundle": HEX_SHA256, "at_ms": {"type": "integer", "minimum": 0},
    }),
    "Reload": obj({"bundle": HEX_SHA256, "changed": BOOL, "audit": COUNT}),
    "Checkpoint": obj({"size": COUNT, "note": {"type": "string", "description": "signed note"},
                       "cosignatures": mapping(STRING, description="cosignature line by witness")
                       }),
    "Entries": obj({"size": COUNT, "entries": array(obj({
        "index": COUNT,
        "raw": {"type": "string", "contentEncoding": "base64",
                "description": "the entry's exact bytes"},
        "entry": {"type": "object",
                  "description": "the decoded entry (bytes as hex), or {error, detail} when it "
                                 "does not decode"},
    }))}),
    "InclusionProof": obj({"index": COUNT, "size": COUNT, "root": HEX_SHA256,
                           "proof": array(HEX_SHA256)}),
    "ConsistencyProof": obj({"old": COUNT, "new": COUNT, "old_root": HEX_SHA256,
                             "new_root": HEX_SHA256, "proof": array(HEX_SHA256)}),
    "OpenApi": {"type": "object", "required": ["openapi", "info", "paths"]},
}

# --- responses, parameters, operations ----------------------------------------------------------

REQUEST_ID_HEADER = {"$ref": "#/components/headers/X-Request-Id"}

ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request is malformed (bad parameter or body)."),
    401: ("Unauthorized", "No bearer token, or one that is not configured."),
    403: ("Forbidden", "The token's role lacks the permission."),
    404: ("NotFound", "No such resource."),
    409: ("Conflict", "The resource is not in a state that allows this."),
    413: ("TooLarge", "The body exceeds 64 KiB."),
    422: ("Unprocessable", "The policy directory did not load; nothing changed."),
    503: ("Unavailable", "Not ready, or storage refused the request."),
}


def _error_response(status: int) -> Schema:
    headers: Schema = {"X-Request-Id": REQUEST_ID_HEADER}
    if status == 401:
        headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string"},
                                       "description": 'Bearer realm="coalition-admin"'}
    return {"description": ERRORS[status][1], "headers": headers,
            "content": {"application/json": {"schema": ERROR_REF}}}


def json_ok(schema: str, description: str = "OK") -> Schema:
    return {"description": description, "headers": {"X-Request-Id": REQUEST_ID_HEADER},
            "content": {"application/json": {"schema": ref(schema)}}}


def query(name: str, description: str, *, required: bool = False,
          default: int | None = None, example: int = 1) -> Schema:
    schema: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_QUERY_INT,
                      "examples": [example]}
    if default is not None:
        schema["default"] = default
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": schema}


NODE_PARAM: Schema = {"name": "node", "in": "path", "required": True,
                      "description": "node name, as in its certificate",
                      "schema": {"type": "string", "minLength": 1, "examples": ["USA-GW2"]}}
REQUEST_ID_PARAM = {"$ref": "#/components/parameters/X-Request-Id"}


def op(operation_id: str, summary: str, permission: str | None, ok: Schema, *,
       tag: str, errors: Iterable[int] = (), parameters: Iterable[Schema] = (),
       body: Schema | None = None, description: str | None = None) -> Schema:
    """One operation. ``permission`` is what the route declares with ``@requires``: ``None``
    means public (``security: []``); otherwise bearer security, 401, and 403 when some role
    lacks the permission."""
    statuses = set(errors)
    if permission is not None:
        statuses.add(401)
        roles = sorted(role for role, allowed in PERMISSIONS.items() if permission in allowed)
        if len(roles) < len(PERMISSIONS):
            statuses.add(403)
        who = f"Needs `{permission}` (roles: {', '.join(roles)})."
    else:
        who = "Public: no token."
    operation: Schema = {
        "operationId": operation_id, "summary": summary, "tags": [tag],
        "description": f"{description}\n\n{who}" if description else who,
        "x-permission": permission,
        "security": [] if permission is None else [{BEARER: []}],
        "parameters": [*parameters, REQUEST_ID_PARAM],
        "responses": {"200": ok, **{str(s): {"$ref": f"#/components/responses/{ERRORS[s][0]}"}
                                    for s in sorted(statuses)}},
    }
    if body is not None:
        operation["requestBody"] = body
    return operation


def _node_action(action: str, verb: str) -> Schema:
    return op(f"{action}Node", f"{verb} a node", "operate", json_ok("NodeAction"),
              tag="nodes", errors=(404, 409, 503), parameters=[NODE_PARAM],
              description="Durable before the answer: an `admin` audit entry records the action "
                          "(refusals too). 409 when the node's status does not allow it.")


def document() -> Schema:
    """The OpenAPI 3.1 document of every admin route (a fresh copy on every call)."""
    paths: dict[str, dict[str, Schema]] = {
        "/healthz": {"get": op("healthz", "Liveness", None, json_ok("Health"), tag="health")},
        "/readyz": {"get": op(
            "readyz", "Readiness", None, json_ok("Ready"), tag="health", errors=[503],
            description="503 while the node listener is down, the audit log has stopped or "
                        "the store is short of room.")},
        "/metrics": {"get": op(
            "metrics", "Prometheus metrics", "read", tag="health",
            ok={"description": "Prometheus text exposition format 0.0.4",
                "headers": {"X-Request-Id": REQUEST_ID_HEADER},
                "content": {"text/plain": {"schema": {"type": "string"}}}})},
        OPENAPI_PATH: {"get": op("openapi", "This document", None, json_ok("OpenApi"),
                                 tag="meta")},
        "/v1/status": {"get": op("status", "Broker status", "read", json_ok("Status"),
                                 tag="status")},
        "/v1/nodes": {"get": op("listNodes", "Every node of the active bundle", "read",
                                json_ok("NodeList"), tag="nodes")},
        "/v1/nodes/{node}": {"get": op(
            "getNode", "One node: status, accreditation, subscriptions, queue", "read",
            json_ok("NodeDetail"), tag="nodes", errors=[404], parameters=[NODE_PARAM])},
        "/v1/nodes/{node}/suspend": {"post": _node_action("suspend", "Suspend")},
        "/v1/nodes/{node}/resume": {"post": _node_action("resume", "Resume")},
        "/v1/nodes/{node}/revoke": {"post": _node_action("revoke", "Revoke")},
        "/v1/queues": {"get": op("queues", "Pending messages by node", "read",
                                 json_ok("Queues"), tag="status")},
        "/v1/policy": {"get": op("policy", "The active policy bundle", "read",
                                 json_ok("Policy"), tag="policy")},
        "/v1/policy/documents": {"get": op(
            "policyDocuments", "The signed documents of the active bundle", "read",
            json_ok("PolicyDocuments"), tag="policy")},
        "/v1/policy/decide": {"post": op(
            "decide", "Release decision dry-run, with every reason", "read",
            json_ok("Decision"), tag="policy", errors=(400, 404, 413),
            body={"required": True, "content": {"application/json": {
                "schema": ref("DecideRequest"), "examples": {"release": {"value": {
                    "label": {"policy": "NATO", "class": "SECRET", "orig": "USA",
                              "rel": ["GBR"], "cats": {}},
                    "sender": "USA-GW1", "recipient": "GBR-GW1", "topic": "reports.daily"}}}}}},
            description="404 when the sender or the recipient is not a node of the bundle.")},
        "/v1/policy/reload": {"post": op(
            "reloadPolicy", "Load the policy directory again", "operate", json_ok("Reload"),
            tag="policy", errors=(409, 422, 503),
            description="409 when the broker was not started from a configuration; 422 when "
                        "the bundle is refused (nothing changes).")},
        "/v1/audit/checkpoint": {"get": op(
            "checkpoint", "The latest signed checkpoint and its cosignatures", "read",
            json_ok("Checkpoint"), tag="audit", errors=[404],
            description="404 before the first checkpoint is signed.")},
        "/v1/audit/entries": {"get": op(
            "auditEntries", "Entries [start, end), at most 1000", "audit",
            json_ok("Entries"), tag="audit", errors=(400, 503),
            parameters=[query("start", "first index", default=0),
                        query("end", "index after the last (default start + 100; "
                                     "clamped to the log size)")])},
        "/v1/audit/proofs/inclusion": {"get": op(
            "inclusionProof", "RFC 6962 inclusion proof", "audit", json_ok("InclusionProof"),
            tag="audit", errors=(400, 503),
            parameters=[query("index", "entry index, below size", required=True, example=0),
                        query("size", "tree size, 1 to the log size", required=True)])},
        "/v1/audit/proofs/consistency": {"get": op(
            "consistencyProof", "RFC 6962 consistency proof", "audit",
            json_ok("ConsistencyProof"), tag="audit", errors=(400, 503),
            parameters=[query("old", "older tree size, 1 to new", required=True),
                        query("new", "newer tree size, 1 to the log size", required=True)])},
        "/v1/audit/export": {"get": op(
            "auditExport", "The whole log as a tar (coalition audit verify reads it)", "audit",
            tag="audit", errors=[409, 503],
            description="One export at a time: 409 while another is running.",
            ok={"description": "a tar holding the audit-export/ directory",
                "headers": {"X-Request-Id": REQUEST_ID_HEADER},
                "content": {"application/x-tar": {}}})},
    }
    return copy.deepcopy({  # the helpers share their constants; the caller owns the result
        "openapi": "3.1.0",
        "info": {"title": "Coalition broker admin API", "version": "1",
                 "description": "The operator's API (DESIGN §10), on its own listener. Errors "
                                "are JSON {error, detail}; every answer carries X-Request-Id."},
        "tags": [{"name": name} for name in ("health", "meta", "status", "nodes", "policy",
                                              "audit")],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "responses": {name: _error_response(status)
                          for status, (name, _) in ERRORS.items()},
            "parameters": {"X-Request-Id": {
                "name": "X-Request-Id", "in": "header", "required": False,
                "description": "a request id to log and echo back: 1 to 64 of [A-Za-z0-9._-]; "
                               "any other value is ignored and a fresh id is made",
                "schema": {"type": "string"}}},
            "headers": {"X-Request-Id": {
                "required": True, "description": "the request id (given or fresh)",
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"}}},
            "securitySchemes": {BEARER: {
                "type": "http", "scheme": "bearer",
                "description": "An admin token (cbt_…) from [[admin.tokens]]; the role decides "
                               "what it may do: viewer reads, auditor also reads the audit "
                               "log, operator also suspends, resumes, revokes and reloads."}},
        },
    })


def register(routes: web.UrlDispatcher) -> None:
    routes.add_get(OPENAPI_PATH, openapi)


@functools.cache
def _served() -> str:
    return json.dumps(document())


@requires(None)
async def openapi(request: web.Request) -> web.Response:
    """The OpenAPI document of this API."""
    return web.json_response(text=_served())
