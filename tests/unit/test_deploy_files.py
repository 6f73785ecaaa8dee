"""deploy/: the systemd unit keeps its hardening, and the unit, the Containerfile and the
example configuration stay true to the code (the commands they run parse with the real CLI,
the ports are the configuration's defaults, the packages installed are the project's, the
commented ``[tls]`` example is a valid section). ``systemd-analyze verify`` and a container
build are not available on CI; these checks are what can run everywhere."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from broker.cli import _broker_serve, _parser
from broker.config import AdminSection, ListenSection, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ROOT = DEPLOY.parent
CONFIG = "/etc/coalition-broker/broker.toml"


def unit_file() -> dict[str, dict[str, list[str]]]:
    """The unit as systemd reads it: sections of keys, each with every value it is given
    (a key may repeat, e.g. LoadCredential=); comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in (DEPLOY / "coalition-broker.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        assert current is not None, f"key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line}"
        current.setdefault(key, []).append(value)
    return sections


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return unit_file()["Service"]


def test_unit_runs_the_broker_on_the_etc_configuration_and_reloads_it_with_sighup(
        service: dict[str, list[str]]) -> None:
    (exec_start,) = service["ExecStart"]
    argv = shlex.split(exec_start)
    assert Path(argv[0]).name == "coalition" and Path(argv[0]).is_absolute()
    args = _parser().parse_args(argv[1:])  # the real CLI accepts it
    assert args.run is _broker_serve and args.config == Path(CONFIG)
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Restart"] == ["on-failure"]
    assert service["Type"] == ["exec"]


@pytest.mark.parametrize(("key", "value"), [
    ("DynamicUser", "yes"), ("StateDirectory", "coalition-broker"),
    ("ConfigurationDirectory", "coalition-broker"), ("NoNewPrivileges", "yes"),
    ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
    ("PrivateDevices", "yes"), ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"), ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
    ("RestrictNamespaces", "yes"), ("LockPersonality", "yes"),
    ("MemoryDenyWriteExecute", "yes"), ("CapabilityBoundingSet", ""),
    ("AmbientCapabilities", ""), ("UMask", "0077"), ("SystemCallArchitectures", "native"),
    ("RestrictSUIDSGID", "yes"), ("RestrictRealtime", "yes"),
])
def test_unit_keeps_its_hardening(service: dict[str, list[str]], key: str, value: str) -> None:
    # The last assignment wins in systemd (except list settings, checked separately).
    assert service.get(key, [None])[-1] == value


def test_unit_system_call_filter_is_an_allow_list_with_privileged_calls_removed(
        service: dict[str, list[str]]) -> None:
    filters = service["SystemCallFilter"]
    assert filters[0] == "@system-service"  # the first, positive entry makes it an allow list
    assert all(f.startswith("~") for f in filters[1:])
    assert "@privileged" in " ".join(filters[1:])


def test_unit_secrets_come_from_the_configuration_directory_as_credentials(
        service: dict[str, list[str]]) -> None:
    sources = dict(c.split(":", 1) for c in service["LoadCredential"])
    assert set(sources) == {"broker.key", "tls.key"}
    assert all(s.startswith("/etc/coalition-broker/") for s in sources.values())
    assert service["LimitNOFILE"] and int(service["LimitNOFILE"][-1]) >= 4096


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined, comments skipped."""
    text = re.sub(r"\\\n\s*", " ", (DEPLOY / "Containerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instruction, _, rest = line.partition(" ")
            out.append((instruction.upper(), rest.strip()))
    return out


def instructions(name: str) -> list[str]:
    return [rest for instruction, rest in containerfile() if instruction == name]


def test_containerfile_runs_the_same_command_as_a_non_root_user() -> None:
    assert all(base.split()[0] == "python:3.11-slim" for base in instructions("FROM"))
    (entrypoint,) = instructions("ENTRYPOINT")
    argv = json.loads(entrypoint)  # exec form: the broker is PID 1 and gets the signals
    assert argv[0] == "coalition"
    args = _parser().parse_args(argv[1:])
    assert args.run is _broker_serve and args.config == Path(CONFIG)
    user = instructions("USER")[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    assert instructions("VOLUME") == ['["/var/lib/coalition-broker"]']


def test_containerfile_exposes_the_default_ports_and_checks_healthz_on_the_admin_port() -> None:
    assert instructions("EXPOSE") == [f"{ListenSection.port} {AdminSection.port}"]
    (healthcheck,) = instructions("HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3:])
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "<healthcheck>", "exec")  # valid Python
    assert f"http://127.0.0.1:{AdminSection.port}/healthz" in argv[2]


def test_containerfile_copies_every_package_the_project_installs() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    top_level = {p.split(".")[0] for p in project["tool"]["setuptools"]["packages"]}
    copied = {rest.split()[0] for rest in instructions("COPY") if "--from" not in rest}
    assert top_level <= copied
    assert project["project"]["readme"] in " ".join(instructions("COPY"))


def test_the_commented_tls_example_of_broker_toml_is_a_valid_section(tmp_path: Path) -> None:
    text = (DEPLOY / "broker.toml").read_text()
    lines = text.splitlines()
    start = lines.index("# [tls]")
    example = []
    for line in lines[start:]:
        if not line.startswith("#"):
            break
        body = line.removeprefix("#").removeprefix(" ")
        if not body.startswith("#"):  # the example's own comments stay comments
            example.append(body)
    table = tomllib.loads(text + "\n" + "\n".join(example) + "\n")
    config = parse_config(table, base=tmp_path)
    assert config.tls.cert == (tmp_path / "tls/broker.crt").resolve()
    assert config.tls.key is not None and config.tls.client_ca is not None


def test_every_package_directory_is_in_the_setuptools_package_list() -> None:
    """A package missing from the list is left out of a wheel (``pip install .``, the
    Containerfile) while the editable install of the tests still finds it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(project["tool"]["setuptools"]["packages"])
    found = {str(init.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("broker", "clients", "policies")
             for init in (ROOT / top).rglob("__init__.py")}
    assert found == listed
