"""A second host, for real (`make test-cluster`): the gpu queue's Celery worker runs in namespaces of its own, as on
another machine: a network namespace joined to this host by a veth pair (its own address, its own loopback), a mount
namespace in which its own copy of the code and DAGs lies over the project folder (the first host's state folder,
lake documents, models and logs are not there; the venv is bound in, as an image carries it), its own empty state
folder and its own hostname. It reaches the stack only over the link, at `cluster.host_address`: S3, the catalog
database, the broker, the Celery result backend and Airflow's API, with the credentials of the gpu worker.

The daily DAG runs a day on one host, then the same day again with the gpu queue on the second host: the same tables,
row counts and vectors (the knowledge store holds the answers). The UI's log of a task that ran there comes from the
object store (Airflow's remote logging). Then the next day, with the second host killed mid-extraction: the shard is
retried on the restarted host and the day completes. The test removes every namespace and link it made."""

from __future__ import annotations

import datetime as dt
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import psutil
import pytest

from reki_core import cluster
from reki_core.config import PROJECT_ROOT
from reki_core.storage.lake import lake_of
from tests.cluster.conftest import (DAG_ID, ClusterStack, cluster_env, failed_logs, task_instances, task_log,
                                    trigger_day, vector_records, wait_for, wait_run)

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.timeout(3600)]

DAY = dt.date(1997, 9, 22)
HOSTNAME = "reki-host2"
GPU_TASKS = ("extract", "encode", "train_if_no_model", "augment")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@dataclass
class Link:
    """A network namespace and the veth pair that joins it to this host: `address` here, `peer_address` there."""

    netns: str
    host_side: str
    address: str
    peer_address: str

    @classmethod
    def make(cls) -> "Link":
        tag = os.getpid() % 10000
        octet = 4 * (os.getpid() % 60)  # a /30 of 10.213.<octet>.0/24 that another test run is unlikely to hold
        link = cls(f"reki-h2-{tag}", f"rk{tag}a", f"10.213.{octet}.1", f"10.213.{octet}.2")
        peer_side = f"rk{tag}b"
        _ip("netns", "add", link.netns)
        try:
            _ip("link", "add", link.host_side, "type", "veth", "peer", "name", peer_side)
            _ip("link", "set", peer_side, "netns", link.netns)
            _ip("addr", "add", f"{link.address}/30", "dev", link.host_side)
            _ip("link", "set", link.host_side, "up")
            _ip("-n", link.netns, "addr", "add", f"{link.peer_address}/30", "dev", peer_side)
            _ip("-n", link.netns, "link", "set", peer_side, "up")
            _ip("-n", link.netns, "link", "set", "lo", "up")
        except BaseException:
            link.remove()
            raise
        return link

    def pids(self) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.netns, check=False).stdout.split()]

    def remove(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("link", "del", self.host_side, check=False)  # its peer goes with it
        _ip("netns", "del", self.netns, check=False)

    def gone(self) -> bool:
        return (self.netns not in _ip("netns", "list").stdout
                and _ip("link", "show", self.host_side, check=False).returncode != 0)


def _namespaces_allowed() -> bool:
    return os.geteuid() == 0 and subprocess.run(["unshare", "--net", "--mount", "true"],
                                                capture_output=True).returncode == 0


@pytest.fixture
def link():
    if not _namespaces_allowed():
        pytest.skip("the second host needs network and mount namespaces: run as root (CAP_SYS_ADMIN, CAP_NET_ADMIN)")
    made = Link.make()
    yield made
    made.remove()


class SecondHost:
    """The gpu worker in `link`'s network namespace, with a mount and UTS namespace of its own."""

    def __init__(self, stack: ClusterStack, link: Link):
        self.stack, self.link = stack, link
        # Outside the project folder, which the host's own copy of the code covers.
        self.root = Path(tempfile.mkdtemp(prefix="reki-host2-", dir="/var/tmp"))
        self.code, self.state = self.root / "code", self.root / "state"
        self.log = self.root / "worker.log"
        self.proc: subprocess.Popen | None = None
        self._copy_code()
        self.state.mkdir(mode=0o700)

    def _copy_code(self) -> None:
        """The tracked files (code, DAGs, config), the smoke model's folder and an empty venv mount point: what an
        image of the project holds."""
        files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                               check=True).stdout.split("\0")
        for name in filter(None, files):
            source = PROJECT_ROOT / name
            if source.is_file():
                (self.code / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, self.code / name)
        shutil.copytree(PROJECT_ROOT / ".reki" / "models" / "smoke-lm", self.code / ".reki" / "models" / "smoke-lm")
        (self.code / ".venv").mkdir()

    def start(self) -> None:
        cfg = self.stack.config()
        env = cluster.worker_environment(cfg, self.state, cluster.supervisord_environment(self.stack.env))
        home = Path(env["HOME"])
        setup = [
            "set -e",
            f"mount --bind {PROJECT_ROOT / '.venv'} {self.code / '.venv'}",
            f"mount --rbind {self.code} {PROJECT_ROOT}",  # this host's code; the first host's .reki/ is not there
            "mount -t tmpfs -o mode=1777 tmpfs /tmp",
            f"mount -t tmpfs -o mode=0700 tmpfs {home / '.cache'}" if (home / ".cache").is_dir() else "true",
            f"hostname {HOSTNAME}",
            f"cd {PROJECT_ROOT}",
            "exec " + shlex.join(cluster.service_commands(cfg)["gpu-worker"]),
        ]
        with open(self.log, "ab") as log:
            # The secrets travel in the environment, never on this command line.
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.link.netns, "unshare", "--mount", "--uts", "--propagation", "private",
                 "bash", "-c", "\n".join(setup)], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def in_namespaces(self, command: str) -> subprocess.CompletedProcess:
        """`command` in the running worker's network, mount and UTS namespaces."""
        return subprocess.run(["nsenter", "-t", str(self.proc.pid), "-n", "-m", "-u", "bash", "-c", command],
                              capture_output=True, text=True, timeout=60)

    def kill(self) -> None:
        """Every process of the host at once, as a power cut: no clean shutdown."""
        for pid in self.link.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""

    def remove(self) -> None:
        self.kill()
        shutil.rmtree(self.root, ignore_errors=True)


# The day's work lists, for the LLM and the encoder: empty on a re-run whose answers the knowledge store (and whose
# vectors the embedding cache) already holds, on any host.
WORK_LISTS = ("knowledge/plan", "embeddings/misses")


def _table_rows(lake, day: dt.date) -> dict[str, int]:
    """Each table's rows for `day` (a per-user dataset's state as of the day)."""
    rows = {}
    for dataset in lake.table_datasets():
        if dataset not in WORK_LISTS and day in lake.partitions(dataset):
            rows[dataset] = len(lake.read_partition(dataset, day, columns=[lake.column_names(dataset)[0]]))
    return rows


def _clear_run(api, run_id: str) -> None:
    """Every task of the run again (the same run key, the same day)."""
    api.call("POST", f"/api/v2/dags/{DAG_ID}/clearTaskInstances",
             {"dry_run": False, "dag_run_id": run_id, "only_failed": False, "reset_dag_runs": True})


def _gpu_tries(api, run_id: str) -> list[dict]:
    """The gpu queue's tasks that ran (a day whose answers are all stored maps no extraction shard)."""
    return [ti for ti in task_instances(api, run_id) if ti["task_id"] in GPU_TASKS and ti["state"] == "success"]


def _listeners_on(address: str) -> set[int]:
    return {c.laddr.port for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.ip == address}


def test_the_gpu_worker_on_a_second_host_publishes_the_same_day_and_survives_being_killed(link, cluster_dir_factory):
    tmp = cluster_dir_factory("two-hosts")
    env = cluster_env(tmp, REKI__CLUSTER__HOST_ADDRESS=link.address, REKI__CLUSTER__TASK_HEARTBEAT_TIMEOUT_S="30",
                      REKI__PATHS__LAKE_URI="s3://reki-lake/lake", REKI__LLM__ENGINE__BATCH_SIZE="4")
    # SeaweedFS on the link's address: both hosts' tasks and Spark's executors reach it there.
    env["REKI__OBJECT_STORE__ENDPOINT_URL"] = env["REKI__OBJECT_STORE__ENDPOINT_URL"].replace("127.0.0.1", link.address)
    stack = ClusterStack(tmp, env)
    host: SecondHost | None = None
    started = stack.up()
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-5000:]
        cfg = cluster.with_cluster_catalog(stack.config())
        api = stack.api()
        assert api.unpause(DAG_ID)

        # What the other host reaches listens on the link's address; PostgreSQL and Redis on loopback too.
        on_link, on_loopback = _listeners_on(link.address), _listeners_on("127.0.0.1")
        c = cfg.cluster
        seaweed_port = int(cfg.object_store.endpoint_url.rsplit(":", 1)[1])
        assert {c.postgres_port, c.redis_port, c.api_port, seaweed_port} <= on_link, on_link
        assert {c.postgres_port, c.redis_port} <= on_loopback, on_loopback
        assert not _listeners_on("0.0.0.0") & {c.postgres_port, c.redis_port, c.api_port, seaweed_port}

        # One host: the day as the profile runs it.
        first_run = trigger_day(api, DAY)
        assert wait_run(api, first_run) == "success", failed_logs(stack, api, first_run)
        task_env = {**cluster.s3_writer_environment(cfg), **cluster.catalog_environment(cfg)}
        with mock.patch.dict(os.environ, task_env):
            lake = lake_of(cfg)
            rows_one_host, vectors_one_host = _table_rows(lake, DAY), vector_records(lake.read_partition("vectors/augmented", DAY))
        assert rows_one_host.get("vectors/augmented", 0) > 0, rows_one_host

        # Two hosts: the gpu queue's worker leaves this host for the other one.
        stack.supervisorctl("stop", "gpu-worker")
        host = SecondHost(stack, link)
        host.start()
        wait_for(lambda: any(HOSTNAME in line for line in host.tail().splitlines() if "ready" in line), 180,
                  f"the second host's worker to be ready:\n{host.tail()}")
        assert host.in_namespaces("hostname").stdout.strip() == HOSTNAME
        for hidden in (stack.state, stack.state / "logs", PROJECT_ROOT / ".reki" / "data",
                       Path(cfg.resolve(cfg.paths.models_dir)) / "checkpoints"):
            assert host.in_namespaces(f"test ! -e {shlex.quote(str(hidden))}").returncode == 0, hidden
        assert host.in_namespaces(f"test -d {shlex.quote(str(host.state))}").returncode == 0
        reach = "exec 3<>/dev/tcp/{}/{}"
        assert host.in_namespaces(reach.format(link.address, c.postgres_port)).returncode == 0, "PostgreSQL over the link"
        assert host.in_namespaces(reach.format("127.0.0.1", c.postgres_port)).returncode != 0, \
            "the first host's loopback must not be the second host's"

        _clear_run(api, first_run)
        assert wait_run(api, first_run) == "success", failed_logs(stack, api, first_run) + host.tail()
        tries = _gpu_tries(api, first_run)
        assert tries and all(ti["hostname"] == HOSTNAME for ti in tries), [(t["task_id"], t["hostname"]) for t in tries]
        with mock.patch.dict(os.environ, task_env):
            lake = lake_of(cfg)
            assert _table_rows(lake, DAY) == rows_one_host
            assert vector_records(lake.read_partition("vectors/augmented", DAY)) == vectors_one_host, "the second host's day published other vectors"

        # The UI shows the second host's log: the API server reads it from the object store.
        augment = next(ti for ti in tries if ti["task_id"] == "augment")
        text = task_log(api, first_run, "augment", augment["try_number"])
        assert f"s3://{cfg.lake.bucket}/{cfg.cluster.task_logs_prefix}/" in text, text[:3000]
        assert "apply_adaptor" in text or "augment" in text, text[:3000]
        assert not list((stack.state / "cluster" / "airflow" / "logs").rglob("*task_id=augment*/attempt="
                                                                             f"{augment['try_number']}.log"))

        # The second host killed mid-extraction: the shard is retried there once it is back, and the day completes.
        day2 = DAY + dt.timedelta(days=1)
        second_run = trigger_day(api, day2)
        with mock.patch.dict(os.environ, task_env):
            lake = lake_of(cfg)
            checkpoints = f"{lake.root}/knowledge/_inflight/dt={day2}/shard-00000"
            wait_for(lambda: any(p.endswith(".parquet") for p in lake.fs.glob(f"{checkpoints}/*.parquet")), 900,
                      "the extraction shard's first checkpoint on the second host", interval=0.2)
        host.kill()
        host.start()
        assert wait_run(api, second_run) == "success", failed_logs(stack, api, second_run) + host.tail()
        extract = [ti for ti in task_instances(api, second_run) if ti["task_id"] == "extract"]
        assert [(ti["try_number"], ti["hostname"]) for ti in extract] == [(2, HOSTNAME)], extract
        with mock.patch.dict(os.environ, task_env):
            shard = lake_of(cfg).read_json(f"_runs/dt={day2}/llm_shard_00000.json")
        assert shard["resumed_from_earlier_attempt"] > 0 and shard["calls"] == shard["answered"], shard
    finally:
        if host is not None:
            host.remove()
        stack.down()
        link.remove()
    assert link.gone(), "the test left a namespace or a link behind"
    assert not link.pids()
