"""Admin routes for the audit log: the latest checkpoint, entries by range, proofs, export.

Everything here is what an auditor verifies for itself: entries come with their exact bytes
(base64) next to a readable rendering, proofs as hex hashes against a signed checkpoint. Nothing
returns an envelope: entries hold only its SHA-256.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from broker.admin.app import CONTEXT, ApiError, requires, token_of
from broker.audit.leaves import entry_from_bytes
from broker.errors import ProtocolError
from broker.store.sqlite import SqliteStore
from clients.export import export_store

log = structlog.get_logger("broker.admin")

MAX_ENTRIES = 1000


def register(routes: web.UrlDispatcher) -> None:
    routes.add_get("/v1/audit/checkpoint", checkpoint)
    routes.add_get("/v1/audit/entries", entries)
    routes.add_get("/v1/audit/proofs/inclusion", inclusion)
    routes.add_get("/v1/audit/proofs/consistency", consistency)
    routes.add_get("/v1/audit/export", export)


def jsonable(value: Any) -> Any:
    """An entry's map as JSON: bytes as hex, tuples as lists, labels and decisions as maps."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    to_map = getattr(value, "to_map", None)
    if callable(to_map):
        return jsonable(to_map())
    return value


def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise ApiError(400, "bad_request", f"query parameter {name} is required")
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
        raise ApiError(400, "bad_request", f"{name} must be a non-negative integer")
    return int(raw)


@requires("read")
async def checkpoint(request: web.Request) -> web.Response:
    """The latest signed checkpoint and the nations' cosignatures of it."""
    latest = request.app[CONTEXT].broker.audit.latest
    if latest is None:
        raise ApiError(404, "not_found", "no checkpoint has been signed yet")
    return web.json_response({"size": latest.size, "note": latest.note,
                              "cosignatures": dict(sorted(latest.cosignatures.items()))})


@requires("audit")
async def entries(request: web.Request) -> web.Response:
    """Entries ``[start, end)`` (at most 1000), each as exact bytes and decoded."""
    audit = request.app[CONTEXT].broker.audit
    start = _int_param(request, "start", 0)
    end = min(_int_param(request, "end", start + 100), audit.size)
    if end - start > MAX_ENTRIES:
        raise ApiError(400, "bad_request", f"at most {MAX_ENTRIES} entries per request")
    listed = []
    for offset, data in enumerate(audit.store.entries(start, end) if start < end else []):
        try:
            entry = jsonable(entry_from_bytes(data).to_map())
        except ProtocolError as exc:  # the raw bytes still go out; the auditor judges
            entry = {"error": exc.code, "detail": exc.reason}
        listed.append({"index": start + offset, "raw": base64.b64encode(data).decode(),
                       "entry": entry})
    return web.json_response({"size": audit.size, "entries": listed})


def _sized(request: web.Request, *names: str) -> list[int]:
    audit = request.app[CONTEXT].broker.audit
    values = [_int_param(request, name) for name in names]
    if values[-1] > audit.size or values[-1] < 1:
        raise ApiError(400, "bad_request", f"{names[-1]} must be between 1 and the log size "
                       f"{audit.size}")
    return values


@requires("audit")
async def inclusion(request: web.Request) -> web.Response:
    """RFC 6962 inclusion proof of entry ``index`` in the tree of ``size`` entries."""
    audit = request.app[CONTEXT].broker.audit
    index, size = _sized(request, "index", "size")
    if index >= size:
        raise ApiError(400, "bad_request", "index must be below size")
    return web.json_response({
        "index": index, "size": size, "root": audit.root(size).hex(),
        "proof": [h.hex() for h in audit.inclusion_proof(index, size)]})


@requires("audit")
async def consistency(request: web.Request) -> web.Response:
    """RFC 6962 consistency proof from tree size ``old`` to ``new``."""
    audit = request.app[CONTEXT].broker.audit
    old, new = _sized(request, "old", "new")
    if not 1 <= old <= new:
        raise ApiError(400, "bad_request", "old must be between 1 and new")
    return web.json_response({
        "old": old, "new": new, "old_root": audit.root(old).hex(),
        "new_root": audit.root(new).hex(),
        "proof": [h.hex() for h in audit.consistency_proof(old, new)]})


@requires("audit")
async def export(request: web.Request) -> web.StreamResponse:
    """The whole log as a tar of the export directory (`coalition audit verify` reads it)."""
    broker = request.app[CONTEXT].broker
    if _EXPORTING.locked():
        raise ApiError(409, "conflict", "an export is already running; retry when it is done")
    async with _EXPORTING:
        return await _send_export(request, broker.data_dir, broker.name)


#: One export at a time: each writes a copy of the log to a temporary directory.
_EXPORTING = asyncio.Lock()


async def _send_export(request: web.Request, data_dir: Path, origin: str) -> web.StreamResponse:
    work = Path(tempfile.mkdtemp(prefix="coalition-export-"))
    try:
        tar = await asyncio.get_running_loop().run_in_executor(
            None, _export_tar, data_dir, origin, work)
        response = web.StreamResponse(headers={
            "Content-Type": "application/x-tar",
            "Content-Disposition": 'attachment; filename="audit-export.tar"'})
        response.content_length = tar.stat().st_size
        await response.prepare(request)
        with tar.open("rb") as stream:
            while chunk := stream.read(1 << 16):
                await response.write(chunk)
        await response.write_eof()
        log.info("audit_exported", token=token_of(request).name, bytes=tar.stat().st_size)
        return response
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _export_tar(data_dir: Path, origin: str, work: Path) -> Path:
    # Its own connection (the broker's reader belongs to the event loop thread), read-only: an
    # export never writes the live store, so it never holds the lock the broker commits under.
    store = SqliteStore.in_dir(data_dir, read_only=True)
    try:
        export_store(store, origin, work / "audit-export")
    finally:
        store.close()
    tar = work / "audit-export.tar"
    with tarfile.open(tar, "w") as archive:
        archive.add(work / "audit-export", arcname="audit-export")
    return tar
