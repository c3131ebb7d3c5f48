"""What an attacker with a shell on the machine would look for, as checks the suites run against the stacks they
already started (the backfill suite's embedded Airflow, the cluster smoke run): generated secrets in logs or files,
files other users may read, sockets beyond loopback, secrets in a process's environment or command line."""

from __future__ import annotations

import ipaddress
import json
import stat
from collections.abc import Iterable
from pathlib import Path

import psutil

from reki_core.localstack import secrets_dir


def generated_secrets(state_dir: Path) -> dict[str, str]:
    """Name -> value of every secret generated under `<state>/secrets/` (each JSON file's string values, and the
    values of `key=value` lines of the Spark properties file)."""
    found: dict[str, str] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif isinstance(value, list):
            for i, inner in enumerate(value):
                walk(f"{prefix}[{i}]", inner)
        elif isinstance(value, str) and len(value) >= 12 and not value.startswith(("reki", "/")):
            found[prefix] = value  # access key ids (`reki<role>...`), names and paths are not secrets

    for path in sorted(secrets_dir(state_dir).iterdir()):
        if path.suffix == ".json":
            walk(path.name, json.loads(path.read_text()))
        elif path.suffix == ".conf":
            for line in path.read_text().splitlines():
                key, _, value = line.partition("=")
                if "secret" in key:
                    found[f"{path.name}:{key.strip()}"] = value.strip()
    return found


def files_under(roots: Iterable[Path], skip: Iterable[Path] = ()) -> list[Path]:
    skipped = [p.resolve() for p in skip]
    out = []
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            if not any(path.resolve().is_relative_to(s) for s in skipped) and not path.is_symlink():
                out.append(path)
    return out


def open_to_others(roots: Iterable[Path], skip: Iterable[Path] = ()) -> list[str]:
    """Files that the group or other users may read or write, and folders they may list or write into (passing
    through, x, is allowed: PostgreSQL's system user must reach its data folder)."""
    found = []
    for path in files_under(roots, skip):
        try:
            mode = stat.S_IMODE(path.lstat().st_mode)
        except FileNotFoundError:  # a log rotated or a temporary file removed meanwhile
            continue
        if (path.is_dir() and mode & 0o066) or (path.is_file() and mode & 0o077):
            found.append(f"{path} {oct(mode)}")
    return found


def secrets_in_files(roots: Iterable[Path], secrets: dict[str, str], skip: Iterable[Path] = ()) -> list[str]:
    """'file: secret name' for every generated secret found in a file under `roots` (logs, databases, configs)."""
    found = []
    for path in files_under(roots, skip):
        try:
            body = path.read_bytes() if path.is_file() else b""
        except (FileNotFoundError, PermissionError):
            continue
        found += [f"{path}: {name}" for name, value in secrets.items() if value.encode() in body]
    return found


def with_children(pids: Iterable[int]) -> list[psutil.Process]:
    procs: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            parent = psutil.Process(pid)
            for proc in [parent, *parent.children(recursive=True)]:
                procs[proc.pid] = proc
        except psutil.NoSuchProcess:
            continue
    return list(procs.values())


def listening_beyond_loopback(procs: Iterable[psutil.Process]) -> list[str]:
    """'pid (name) ip:port' of every listening TCP socket that is not on a loopback address (none of the stacks'
    servers speaks UDP; a resolver's short-lived UDP socket is no server)."""
    found = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
            name = proc.name()
        except psutil.Error:
            continue
        for conn in conns:
            address = ipaddress.ip_address(conn.laddr.ip)
            address = getattr(address, "ipv4_mapped", None) or address  # Java's ::ffff:127.0.0.1 is loopback
            if conn.status == psutil.CONN_LISTEN and not address.is_loopback:
                found.append(f"{proc.pid} ({name}) {conn.laddr.ip}:{conn.laddr.port}")
    return found


def listening_ports(procs: Iterable[psutil.Process]) -> set[int]:
    ports = set()
    for proc in procs:
        try:
            ports |= {c.laddr.port for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            continue
    return ports


def secrets_held(proc: psutil.Process, secrets: dict[str, str]) -> tuple[set[str], set[str]]:
    """(names of the secrets in the process's environment, names of those on its command line)."""
    try:
        environ = "\0".join(f"{k}={v}" for k, v in proc.environ().items())
        cmdline = "\0".join(proc.cmdline())
    except psutil.Error:
        return set(), set()
    return ({n for n, v in secrets.items() if v in environ}, {n for n, v in secrets.items() if v in cmdline})
