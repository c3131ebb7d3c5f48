"""The lake's tables: Apache Iceberg tables in the lake bucket (`lake.bucket`) on the object store, tracked by an
Iceberg JDBC catalog in a database of its own (`lake.catalog_uri`; the embedded profile's SQLite file by default).

One place builds both ends from the config:
- `spark_catalog_conf`: the Spark catalog `lake.catalog` (Iceberg's SparkCatalog over its JdbcCatalog), s3a:// to the
  store path-style with capped retries, credentials from the JVM's environment (AWS_ACCESS_KEY_ID /
  AWS_SECRET_ACCESS_KEY: never a `--conf`, which a command line and Spark's UI show), and the pinned jars. The
  Connect server and classic sessions start with it (reki_core/spark.py).
- `append_spark_properties`: the same settings (and the catalog's login) into an owner-only Spark properties file: how
  the deployed Connect servers (infra/deploy/: compose, Kubernetes) start with them (`reki lake spark-conf`).
- `python_catalog` / `LakeTables`: pyiceberg's SqlCatalog on the same database and warehouse for Python tasks, with
  an identity of the caller's choice (a consumer's read-only one), its S3 errors explained (identity and bucket).

A catalog commit is a compare-and-set of the table's metadata pointer in the database: concurrent writers never
depend on the object store's conditional writes (docs/design.md, table format).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from reki_core.storage.s3_access import S3Access, resolve_s3_access

if TYPE_CHECKING:
    import pyarrow as pa
    from pyiceberg.catalog.sql import SqlCatalog
    from pyiceberg.table import Table

    from reki_core.config import Config

ICEBERG_EXTENSIONS = "org.apache.iceberg.spark.extensions.IcebergSparkSessionExtensions"
# The catalog database's login in the cluster profile (PostgreSQL): from the environment, never the config.
CATALOG_USER_ENV = "REKI_CATALOG_DB_USER"
CATALOG_PASSWORD_ENV = "REKI_CATALOG_DB_PASSWORD"


def warehouse_uri(cfg: Config) -> str:
    return f"s3a://{cfg.lake.bucket}/{cfg.lake.warehouse_prefix.strip('/')}"


def sqlite_catalog_file(cfg: Config) -> Path:
    """The embedded profile's catalog database: a per-host set-up artefact beside the other state, not lake data."""
    return cfg.state_dir / "catalog" / "iceberg.sqlite"


def jdbc_uri(cfg: Config) -> str:
    """The catalog database as a JDBC URL (Iceberg's JdbcCatalog); creates the SQLite file's folder."""
    if cfg.lake.catalog_uri:
        return cfg.lake.catalog_uri
    path = sqlite_catalog_file(cfg)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return f"jdbc:sqlite:{path}"


def sqlalchemy_uri(cfg: Config) -> str:
    """The same database as a SQLAlchemy URL (pyiceberg's SqlCatalog)."""
    uri = jdbc_uri(cfg)
    if uri.startswith("jdbc:sqlite:"):
        return f"sqlite:///{uri.removeprefix('jdbc:sqlite:')}"
    if uri.startswith("jdbc:postgresql://"):
        user, password = os.environ.get(CATALOG_USER_ENV, ""), os.environ.get(CATALOG_PASSWORD_ENV, "")
        login = f"{user}:{password}@" if user else ""
        return f"postgresql+psycopg2://{login}{uri.removeprefix('jdbc:postgresql://')}"
    raise ValueError(f"lake.catalog_uri {uri!r}: only jdbc:sqlite: and jdbc:postgresql:// catalogs are supported")


def s3a_conf(cfg: Config) -> dict[str, str]:
    """Hadoop's s3a settings for the object store: path-style, credentials from the environment, retries capped."""
    endpoint = cfg.object_store.endpoint_url
    attempts, lake = str(cfg.lake.s3_attempts), cfg.lake
    conf = {
        "fs.s3a.endpoint": endpoint,
        "fs.s3a.endpoint.region": cfg.object_store.region,
        "fs.s3a.path.style.access": "true",
        "fs.s3a.connection.ssl.enabled": str(urlparse(endpoint).scheme == "https").lower(),
        # Uploads are buffered in memory, not in a local temp file: no lake bytes on the local disk.
        "fs.s3a.fast.upload.buffer": "bytebuffer",
        # Only the environment's identity: no instance-metadata probe that would stall a task on a machine without one.
        "fs.s3a.aws.credentials.provider": "software.amazon.awssdk.auth.credentials.EnvironmentVariableCredentialsProvider",
        # The SDK's attempts and s3a's own retries (defaults: 5 and 7 with backoff, minutes on a dead store).
        "fs.s3a.attempts.maximum": attempts,
        "fs.s3a.retry.limit": attempts,
        "fs.s3a.retry.interval": "250ms",
        "fs.s3a.retry.throttle.limit": attempts,
        "fs.s3a.retry.throttle.interval": "250ms",
        "fs.s3a.connection.establish.timeout": str(int(lake.s3_connect_timeout_s * 1000)),
        "fs.s3a.connection.timeout": str(int(lake.s3_request_timeout_s * 1000)),
        "fs.s3a.connection.request.timeout": str(int(lake.s3_request_timeout_s * 1000)),
        "fs.s3a.connection.acquisition.timeout": str(int(lake.s3_connect_timeout_s * 1000)),
    }
    return {f"spark.hadoop.{key}": value for key, value in conf.items()}


def spark_catalog_conf(cfg: Config) -> dict[str, str]:
    """What a Spark driver needs to use the lake's tables: jars, Iceberg's extensions, the catalog, s3a. Nothing
    secret (the cluster profile's catalog login goes to its 0600 properties file: `catalog_secret_conf`)."""
    from reki_core.jars import spark_jar_conf

    return {**spark_jar_conf(), **catalog_settings(cfg)}


def catalog_settings(cfg: Config) -> dict[str, str]:
    """`spark_catalog_conf` without the jars: what a process that starts no JVM needs to name the catalog (a gpu
    worker's image has no connector jars)."""
    prefix = f"spark.sql.catalog.{cfg.lake.catalog}"
    return {
        "spark.sql.extensions": ICEBERG_EXTENSIONS,
        prefix: "org.apache.iceberg.spark.SparkCatalog",
        f"{prefix}.catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
        f"{prefix}.uri": jdbc_uri(cfg),
        # The catalog tables' schema with views, as pyiceberg's SqlCatalog writes and reads it (the same database).
        f"{prefix}.jdbc.schema-version": "V1",
        f"{prefix}.warehouse": warehouse_uri(cfg),
        f"{prefix}.io-impl": "org.apache.iceberg.hadoop.HadoopFileIO",  # s3a, one S3 client and retry policy
        # The warm server outlives every task: each read loads the table's current metadata, never a cached one.
        f"{prefix}.cache-enabled": "false",
        **s3a_conf(cfg),
    }


def catalog_secret_conf(cfg: Config) -> dict[str, str]:
    """The catalog database's login as Spark settings, for a properties file only (cluster profile)."""
    user, password = os.environ.get(CATALOG_USER_ENV), os.environ.get(CATALOG_PASSWORD_ENV)
    if not user:
        return {}
    prefix = f"spark.sql.catalog.{cfg.lake.catalog}.jdbc"
    return {f"{prefix}.user": user, f"{prefix}.password": password or ""}


def properties_lines(conf: dict[str, str]) -> str:
    """Spark settings as a properties file's `key=value` lines (java.util.Properties: a backslash escapes)."""
    lines = []
    for key, value in conf.items():
        if "\n" in value or "\r" in value:
            raise ValueError(f"Spark setting {key}: a value with a line break cannot go into a properties file")
        lines.append(f"{key}={value.replace(chr(92), 2 * chr(92))}\n")
    return "".join(lines)


def append_spark_properties(cfg: Config, path: Path) -> list[str]:
    """Append the lake's catalog settings (`spark_catalog_conf`) and the catalog's login (`catalog_secret_conf`, from
    the environment) to the Spark properties file `path` (`--properties-file`), creating it owner-only: how a deployed
    Connect server gets them without a `--conf` on its command line. Refuses a file others may read. Returns the keys
    written (never the values)."""
    conf = {**spark_catalog_conf(cfg), **catalog_secret_conf(cfg)}
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "a") as out:
        if os.fstat(out.fileno()).st_mode & 0o077:
            raise PermissionError(f"{path}: the Spark properties file gets the catalog's login: it must be readable by "
                                  f"its owner alone (chmod 600, or write it under umask 077)")
        out.write(properties_lines(conf))
    return list(conf)


def lake_access(cfg: Config, *, access_key: str | None = None, secret_key: str | None = None) -> S3Access:
    """An identity on the lake bucket: the given keys, else AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. The endpoint is
    the config's, as Spark's s3a uses (not AWS_ENDPOINT_URL: both ends must reach the same store)."""
    return resolve_s3_access(cfg, endpoint_url=cfg.object_store.endpoint_url, access_key=access_key,
                             secret_key=secret_key, bucket=cfg.lake.bucket)


def pyiceberg_properties(access: S3Access, connect_timeout_s: float, request_timeout_s: float) -> dict[str, str]:
    """pyiceberg's SqlCatalog settings besides its database and warehouse: the catalog schema both ends use, and S3
    as `access`, path-style and bounded like s3a (pyarrow's default retry strategy makes 3 attempts, each within these
    timeouts)."""
    return {
        "schema_version": "v1",  # the catalog tables with views, as Iceberg's JdbcCatalog (jdbc.schema-version V1)
        "py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO",
        "s3.endpoint": access.endpoint_url,
        "s3.access-key-id": access.access_key,
        "s3.secret-access-key": access.secret_key,
        "s3.region": access.region,
        "s3.force-virtual-addressing": "false",  # path-style, as s3a
        "s3.connect-timeout": str(connect_timeout_s),
        "s3.request-timeout": str(request_timeout_s),
    }


def s3fs_options(cfg: Config, access: S3Access) -> dict:
    """fsspec's S3 settings for a lake root on the object store (its documents and stores), as `access`: the config's
    endpoint, path-style, bounded like s3a, and no listing cache (other processes write the same prefixes)."""
    return {
        "key": access.access_key,
        "secret": access.secret_key,
        "endpoint_url": access.endpoint_url,
        "use_listings_cache": False,
        "skip_instance_cache": True,  # each lake its own client: the identity is the lake's, not a cached one's
        "config_kwargs": {"s3": {"addressing_style": "path"}, "connect_timeout": cfg.lake.s3_connect_timeout_s,
                          "read_timeout": cfg.lake.s3_request_timeout_s,
                          "retries": {"max_attempts": cfg.lake.s3_attempts, "mode": "standard"}},
        "client_kwargs": {"region_name": access.region},
    }


def python_catalog(cfg: Config, access: S3Access) -> SqlCatalog:
    """pyiceberg's SqlCatalog on the lake's catalog database, reading and writing objects as `access`."""
    from pyiceberg.catalog.sql import SqlCatalog

    return SqlCatalog(cfg.lake.catalog, uri=sqlalchemy_uri(cfg), warehouse=warehouse_uri(cfg),
                      **pyiceberg_properties(access, cfg.lake.s3_connect_timeout_s, cfg.lake.s3_request_timeout_s))


def table_store_error(exc: Exception, what: str, access: S3Access):
    """An `ObjectStoreError` for pyarrow's S3 failure `exc` during `what`: the bucket, the identity, the meaning."""
    from reki_core.storage.s3_access import ObjectStoreError

    text = str(exc)
    if "ACCESS_DENIED" in text or "AccessDenied" in text or "403" in text:
        meaning = "the store refused this identity (unknown access key, wrong secret, or no permission for this bucket)"
    elif "NETWORK_CONNECTION" in text or "Couldn't connect" in text or "connect" in text.lower():
        meaning = "cannot connect (is the object store running? check object_store.endpoint_url)"
    else:
        meaning = text.splitlines()[0] if text else type(exc).__name__
    return ObjectStoreError(f"{what} in s3://{access.bucket} as identity '{access.access_key}' at "
                            f"{access.endpoint_url} failed: {meaning}")


class LakeTables:
    """The lake's tables for a Python task or a consumer, as one identity; S3 failures name identity and bucket."""

    def __init__(self, cfg: Config, access: S3Access):
        self.cfg, self.access = cfg, access
        self.catalog = python_catalog(cfg, access)

    def _explain(self, exc: Exception, operation: str, name: str):
        return table_store_error(exc, f"{operation} table {self.cfg.lake.catalog}.{name}", self.access)

    def load(self, name: str) -> Table:
        """The table `namespace.table` as of its current snapshot (reads its metadata from the store)."""
        try:
            return self.catalog.load_table(name)
        except OSError as exc:
            raise self._explain(exc, "loading", name) from exc

    def read(self, name: str, row_filter: str | None = None, snapshot_id: int | None = None) -> pa.Table:
        """The table's rows (as of `snapshot_id`, default the current snapshot), those matching `row_filter` if given
        (pyiceberg's expression syntax, e.g. "dt = '1997-09-23'")."""
        table = self.load(name)
        try:
            return table.scan(**({"row_filter": row_filter} if row_filter else {}), snapshot_id=snapshot_id).to_arrow()
        except OSError as exc:
            raise self._explain(exc, "reading", name) from exc


def ensure_lake_bucket(cfg: Config, access: S3Access) -> None:
    """Create the lake bucket when it does not exist (the writer identity; the stack does it at start)."""
    from botocore.exceptions import ClientError

    from reki_core.storage.s3_access import explain

    client = access.client()
    try:
        client.head_bucket(Bucket=cfg.lake.bucket)
    except ClientError:
        try:
            client.create_bucket(Bucket=cfg.lake.bucket)
        except ClientError as exc:
            raise explain(exc, access, "create bucket") from exc
