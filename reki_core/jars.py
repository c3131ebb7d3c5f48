"""Spark's connector jars (Iceberg, s3a, JDBC drivers), pinned in `conf/spark-jars.lock.json` by coordinates and
sha256, downloaded once by `reki setup` into a cache that every clone on this machine shares.

The cache is `$REKI_JAR_CACHE`, else `$XDG_CACHE_HOME/reki/jars` (`~/.cache/reki/jars`), laid out as Maven's
repository is (`group/as/path/artifact/version/artifact-version.jar`): a path names its coordinates. A jar enters
the cache only after its sha256 matched the lock file (downloaded to a temporary name, renamed when verified), so
a Spark JVM never sees a partial or tampered file. Sessions get them from `spark_jar_conf` (never `--packages`,
which would resolve from the network at each start).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from reki_core.config import PROJECT_ROOT

LOCK_FILE = PROJECT_ROOT / "conf" / "spark-jars.lock.json"
REPOSITORY_ENV = "REKI_MAVEN_REPOSITORY"  # a mirror of Maven Central, where one is used
CACHE_ENV = "REKI_JAR_CACHE"


class JarError(RuntimeError):
    """A pinned jar is missing from the cache, or what was downloaded is not what the lock file pins."""


@dataclass(frozen=True)
class PinnedJar:
    group: str
    artifact: str
    version: str
    sha256: str

    @property
    def coordinates(self) -> str:
        return f"{self.group}:{self.artifact}:{self.version}"

    @property
    def relative_path(self) -> str:
        return f"{self.group.replace('.', '/')}/{self.artifact}/{self.version}/{self.artifact}-{self.version}.jar"


def pinned_jars(lock_file: Path = LOCK_FILE) -> tuple[list[PinnedJar], str]:
    """The lock file's jars and its repository (overridden by $REKI_MAVEN_REPOSITORY)."""
    try:
        lock = json.loads(lock_file.read_text())
        jars = []
        for entry in lock["jars"]:
            group, artifact, version = entry["coordinates"].split(":")
            jars.append(PinnedJar(group, artifact, version, entry["sha256"].lower()))
    except (OSError, ValueError, KeyError) as exc:
        raise JarError(f"{lock_file}: not a readable jar lock file ({type(exc).__name__}: {exc})") from exc
    return jars, os.environ.get(REPOSITORY_ENV) or lock["repository"]


def cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "reki" / "jars"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified_stamp(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def _is_verified(jar: PinnedJar, path: Path) -> bool:
    """Whether `path` holds `jar`: its hash is recomputed only when size or mtime changed since it was verified (the
    SDK bundle is 640 MB)."""
    if not path.is_file():
        return False
    stat = path.stat()
    seen = f"{jar.sha256} {stat.st_size} {stat.st_mtime_ns}"
    stamp = _verified_stamp(path)
    if stamp.is_file() and stamp.read_text() == seen:
        return True
    if _sha256(path) != jar.sha256:
        return False
    stamp.write_text(seen)
    return True


def _download(jar: PinnedJar, repository: str, path: Path, timeout_s: float) -> None:
    url = f"{repository.rstrip('/')}/{jar.relative_path}"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                out.write(block)
        if digest.hexdigest() != jar.sha256:
            raise JarError(f"{jar.coordinates} from {url} has sha256 {digest.hexdigest()}, but the lock file "
                           f"pins {jar.sha256}: not used (a changed artifact or a bad mirror)")
        os.replace(tmp, path)
    except OSError as exc:
        raise JarError(f"downloading {jar.coordinates} from {url} failed: {exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)


def ensure_jars(report: Callable[[str], None] = lambda line: None, timeout_s: float = 120.0,
                lock_file: Path = LOCK_FILE) -> list[Path]:
    """Every pinned jar in the cache, verified; downloads the missing ones (set-ups of two clones take turns)."""
    jars, repository = pinned_jars(lock_file)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for jar in jars:
            path = root / jar.relative_path
            if not _is_verified(jar, path):
                report(f"downloading {jar.coordinates}")
                _download(jar, repository, path, timeout_s)
                _is_verified(jar, path)  # records the stamp
            paths.append(path)
    return paths


def jar_paths(lock_file: Path = LOCK_FILE) -> list[Path]:
    """The cached jars' paths, without downloading: a missing one raises `JarError` saying to run `reki setup`."""
    jars, _ = pinned_jars(lock_file)
    root = cache_dir()
    paths = [root / jar.relative_path for jar in jars]
    missing = [jar.coordinates for jar, path in zip(jars, paths) if not path.is_file()]
    if missing:
        raise JarError(f"Spark's connector jars {', '.join(missing)} are not in the jar cache {root}: run `reki setup` "
                       f"(or `make setup`), which downloads the versions {LOCK_FILE.name} pins")
    return paths


def spark_jar_conf() -> dict[str, str]:
    """The jars on the driver's and the executors' class paths, from the cache (each host has it, as an image has its
    contents). Not `spark.jars`: that ships every jar (700 MB with the AWS SDK bundle) to each executor's work folder;
    and JDBC drivers must be on the JVM's own class path for DriverManager to see them."""
    class_path = os.pathsep.join(str(p) for p in jar_paths())
    return {"spark.driver.extraClassPath": class_path, "spark.executor.extraClassPath": class_path}
