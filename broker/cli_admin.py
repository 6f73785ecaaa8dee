"""``coalition admin …``: the operator's commands, over the broker's admin HTTP API.

The token is read from ``--token-file`` or the ``COALITION_ADMIN_TOKEN`` environment variable,
never from the command line (where process lists and shell history would keep it). Every
command prints a short human answer, or the API's JSON with ``--json``; an error answer prints
``error: CODE: detail`` and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from broker.admin.auth import hash_token, new_token
from broker.config import ROLES, load_config
from broker.errors import BrokerError, ConfigError

TOKEN_ENV = "COALITION_ADMIN_TOKEN"


class AdminError(BrokerError):
    """The admin API answered with an error (or could not be reached)."""

    code = "admin"


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``coalition admin`` and its subcommands."""
    admin = commands.add_parser("admin", help="operate a running broker over its admin API")
    sub = admin.add_subparsers(title="admin commands")

    token = sub.add_parser("token", help="make a bearer token and its [[admin.tokens]] entry")
    token.add_argument("--name", required=True, help="who holds it (named in audit entries)")
    token.add_argument("--role", required=True, choices=ROLES)
    token.set_defaults(run=_token)

    def command(name: str, help_text: str, path: str, method: str = "GET",
                node: bool = False) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text)
        _connection_args(parser)
        if node:
            parser.add_argument("node")
        parser.set_defaults(run=_request, method=method, path=path, show=name)
        return parser

    command("status", "broker status and readiness", "/v1/status")
    command("nodes", "every node: status, online, queue depth", "/v1/nodes")
    command("node", "one node in detail", "/v1/nodes/{node}", node=True)
    command("queues", "queued copies per recipient", "/v1/queues")
    command("checkpoint", "the latest signed checkpoint and its cosignatures",
            "/v1/audit/checkpoint")
    for action in ("suspend", "resume", "revoke"):
        command(action, f"{action} a node (an admin audit entry names you)",
                f"/v1/nodes/{{node}}/{action}", method="POST", node=True)
    command("reload", "load the policy directory again", "/v1/policy/reload", method="POST")
    decide = command("decide", "dry-run one release decision, with its reasons",
                     "/v1/policy/decide", method="POST")
    decide.add_argument("--label", required=True,
                        help='JSON, e.g. {"policy":"NATO","class":"SECRET","orig":"USA",'
                             '"rel":["GBR"],"cats":{}}')
    decide.add_argument("--sender", required=True)
    decide.add_argument("--recipient", required=True)
    decide.add_argument("--topic", required=True)


def _connection_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="admin API base URL (default: from --config, else "
                        "http://127.0.0.1:8471)")
    parser.add_argument("--config", type=Path, help="the broker's configuration ([admin])")
    parser.add_argument("--token-file", type=Path,
                        help=f"file holding the bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    parser.add_argument("--timeout", type=float, default=30.0)


def _token(args: argparse.Namespace) -> int:
    token = new_token()
    print(f"token (give it to {args.name}; it is shown once and stored nowhere):\n  {token}\n")
    print("add to the broker configuration:\n")
    print(f'[[admin.tokens]]\nname = "{args.name}"\nrole = "{args.role}"\n'
          f'sha256 = "{hash_token(token).hex()}"')
    return 0


def _base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    if args.config is not None:
        admin = load_config(args.config).admin
        if admin.port < 0:
            raise ConfigError("the admin API is turned off in this configuration (port = -1)")
        return f"http://{admin.host}:{admin.port}"
    return "http://127.0.0.1:8471"


def _read_token(args: argparse.Namespace) -> str:
    if args.token_file is not None:
        try:
            token = str(args.token_file.read_text(encoding="utf-8")).strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the token file {args.token_file}: "
                              f"{exc.strerror}") from exc
    else:
        token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise ConfigError(f"no admin token: use --token-file or set {TOKEN_ENV}")
    return token


def _request(args: argparse.Namespace) -> int:
    path = str(args.path).replace("{node}", getattr(args, "node", "") or "")
    body = None
    if args.show == "decide":
        try:
            label = json.loads(args.label)
        except ValueError as exc:
            raise ConfigError(f"--label is not JSON: {exc}") from exc
        body = {"label": label, "sender": args.sender, "recipient": args.recipient,
                "topic": args.topic}
    answer = asyncio.run(_call(_base_url(args), args.method, path, _read_token(args), body,
                               args.timeout))
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        _print(args.show, answer)
    return 0


async def _call(base: str, method: str, path: str, token: str, body: Any,
                timeout: float) -> Any:
    import aiohttp  # here: the CLI's other commands start without it (~0.2 s)

    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http, \
                http.request(method, base + path, json=body, headers=headers) as response:
            try:
                answer = await response.json(content_type=None)
            except ValueError:
                answer = {"error": "bad_answer", "detail": (await response.text())[:200]}
            if response.status >= 400:
                raise AdminError(str(answer.get("detail", "")) if isinstance(answer, dict)
                                 else str(answer),
                                 code=str(answer.get("error", response.status))
                                 if isinstance(answer, dict) else str(response.status))
            return answer
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AdminError(f"cannot reach the admin API at {base}: {exc}",
                         code="unreachable") from exc


def _print(show: str, answer: Any) -> None:
    """A few lines a person reads; ``--json`` has everything."""
    out = sys.stdout.write
    if show == "status":
        out(f"broker     {answer['broker']}  ({'ready' if answer['ready'] else 'NOT READY: '}"
            f"{answer['not_ready'] or ''})\n"
            f"bundle     {answer['bundle']}\n"
            f"audit      {answer['audit']['size']} entries, checkpoint "
            f"{answer['audit']['checkpoint']}\n"
            f"nodes      {answer['connections']} of {answer['nodes']} connected, "
            f"{answer['queued']} copies queued\n")
    elif show == "nodes":
        for node in answer["nodes"]:
            out(f"{node['node']:<16} {node['nation']:<5} {node['status']:<10} "
                f"{'online' if node['online'] else 'offline':<8} queued {node['queue_depth']}\n")
    elif show == "queues":
        for queue in answer["queues"]:
            out(f"{queue['node']:<16} {queue['depth']:>7} owed, {queue['in_flight']} in flight, "
                f"{queue['bytes']} bytes  {queue['by_precedence']}\n")
        out(f"total {answer['total']}\n")
    elif show == "checkpoint":
        out(answer["note"])
        out(f"cosigned by {', '.join(sorted(answer['cosignatures'])) or 'nobody yet'}\n")
    elif show == "decide":
        out(f"{answer['status']}" + (f" via {answer['via']}" if answer["via"] else "") + "\n")
    else:
        out(json.dumps(answer, indent=2, sort_keys=True) + "\n")
