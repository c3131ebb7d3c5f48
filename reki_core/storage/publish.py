"""Publish versioned augmented vectors to object storage: immutable, atomic, verifiable.

Layout (ARCHITECTURE.md "Data zones"):

    s3://<bucket>/<scenario>/vectors/v=<dt>_<run_id>/user_vectors.<sha16>.parquet, item_vectors.<sha16>.parquet,
                                                     adaptor.<sha16>.pt, model_card.<sha16>.*, quality_summary.<sha16>.json,
                                                     run_report*.<sha16>.* (when given), manifest.json (LAST)
    s3://<bucket>/<scenario>/vectors/_LATEST.json

A version without `manifest.json` does not exist for consumers, who find each file by its name in the
manifest (`files[name].key`). A file's object name carries the first 16 hex digits of its sha256, so
bytes never change under a key: a second attempt of the same version racing the first cannot change
a file that the winner's manifest covers. `_LATEST.json` moves only after the
manifest reads back intact, and only forward in (dt, manifest created_at): a backfill of an older
date publishes its version but leaves `latest` alone. The pointer is moved with S3 conditional
writes (If-Match / If-None-Match), so racing publishers end with one consistent `latest`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import random
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reki_core.storage.lake import as_date
from reki_core.storage.s3_access import ObjectStore, ObjectStoreError, resolve_s3_access

MANIFEST = "manifest.json"
LATEST = "_LATEST.json"
QUALITY_SUMMARY = "quality_summary.json"
VECTOR_FILES = {"user_vectors.parquet": "user", "item_vectors.parquet": "item"}
MANIFEST_FORMAT = 1
HALF_WRITTEN_MAX_AGE = dt.timedelta(days=1)
# Manifest keys computed here; metadata may not override them.
_COMPUTED_KEYS = {"format_version", "scenario", "dt", "run_id", "version", "uri", "created_at", "files",
                  "row_counts", "vector_dim", "has_group_vectors", "run_report_files", "code_version"}
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PublishError(RuntimeError):
    """Publishing was refused or failed; the message names the file, column or rule."""


# ---------------------------------------------------------------- names and keys


def safe_run_id(run_id: str) -> str:
    """Airflow run ids carry ':' and '+'; object keys keep letters, digits, '.', '_' and '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", run_id).strip("-")
    if not cleaned:
        raise PublishError(f"run_id {run_id!r} has no usable characters")
    return cleaned


def version_name(day: str | dt.date, run_id: str) -> str:
    return f"{as_date(day).isoformat()}_{safe_run_id(run_id)}"


def vectors_prefix(scenario: str) -> str:
    return f"{scenario}/vectors/"


def version_prefix(scenario: str, version: str) -> str:
    return f"{vectors_prefix(scenario)}v={version}/"


def latest_key(scenario: str) -> str:
    return vectors_prefix(scenario) + LATEST


def _normalise_version(name: str) -> str:
    name = name.strip().strip("/")
    return name[2:] if name.startswith("v=") else name


# ---------------------------------------------------------------- content checks


def _source(source: str | Path | bytes) -> bytes | Path:
    """Bytes as given, or a file checked to exist: read from disk as it is hashed, checked and uploaded, never whole."""
    if isinstance(source, bytes):
        return source
    path = Path(source)
    if not path.is_file():
        raise PublishError(f"file to publish {path} does not exist")
    return path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_and_size(source: bytes | Path) -> tuple[str, int]:
    if isinstance(source, bytes):
        return sha256_hex(source), len(source)
    with source.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest(), source.stat().st_size


def describe_vectors(name: str, data: bytes | Path, batch_rows: int = 8192) -> dict[str, Any]:
    """Row count, dimension and kinds of a vectors file, read `batch_rows` rows at a time; fails naming the file,
    column and rule."""
    try:
        parquet = pq.ParquetFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise PublishError(f"{name}: not a readable Parquet file ({exc})") from exc
    schema = parquet.schema_arrow
    for column in ("entity_kind", "entity_id", "vector"):
        if column not in schema.names:
            raise PublishError(f"{name}: required column '{column}' is missing (has {schema.names})")
    if parquet.metadata.num_rows == 0:
        raise PublishError(f"{name}: no rows; refusing to publish an empty vectors file")
    vector_type = schema.field("vector").type
    if not pa.types.is_list(vector_type) and not pa.types.is_fixed_size_list(vector_type):
        raise PublishError(f"{name}: column 'vector' must be list<float>, is {vector_type}")
    with_versions = "model_version" in schema.names
    nulls = {"vector": 0, "entity_kind": 0, "entity_id": 0}
    lengths, finite = [], True
    kinds: set = set()
    model_versions: set = set()
    key_hashes = []  # 8 bytes an entity, not its key: duplicates found with bounded memory per row
    for batch in parquet.iter_batches(batch_size=batch_rows):
        for column in nulls:
            nulls[column] += batch.column(column).null_count
        vectors = batch.column("vector")
        span = pc.min_max(pc.list_value_length(vectors))
        lengths += [n for n in (span["min"].as_py(), span["max"].as_py()) if n is not None]
        values = vectors.flatten().to_numpy(zero_copy_only=False)
        finite = finite and bool(np.isfinite(values).all())
        kinds.update(pc.unique(batch.column("entity_kind")).to_pylist())
        if with_versions:
            model_versions.update(pc.unique(batch.column("model_version")).to_pylist())
        keys = pc.binary_join_element_wise(batch.column("entity_kind").cast(pa.string()),
                                           batch.column("entity_id").cast(pa.string()), "\x1f")
        key_hashes.append(pd.util.hash_array(np.asarray(keys.to_pylist(), dtype=object)))
    if nulls["vector"]:
        raise PublishError(f"{name}: column 'vector' has {nulls['vector']} null rows")
    shortest, longest = (min(lengths), max(lengths)) if lengths else (None, None)
    if shortest != longest or not shortest:
        raise PublishError(f"{name}: column 'vector' must have one non-zero length, has {shortest}..{longest}")
    if not finite:
        raise PublishError(f"{name}: column 'vector' has NaN or infinite values")
    for column in ("entity_kind", "entity_id"):
        if nulls[column]:
            raise PublishError(f"{name}: column '{column}' has {nulls[column]} null rows")
    # Two keys with one 64-bit hash would refuse a good file: at 10^7 entities, odds about 3e-6.
    if len(np.unique(np.concatenate(key_hashes))) != parquet.metadata.num_rows:
        raise PublishError(f"{name}: duplicate (entity_kind, entity_id) rows; each entity must appear once")
    kinds_found = sorted(kinds)
    expected = VECTOR_FILES[name]
    wrong = [k for k in kinds_found if k != expected and k != f"{expected}_group"]
    if wrong:
        raise PublishError(f"{name}: column 'entity_kind' has {wrong}; allowed '{expected}' and '{expected}_group'")
    return {"rows": parquet.metadata.num_rows, "dim": int(shortest), "kinds": kinds_found,
            "model_versions": sorted(model_versions)}


def code_version() -> dict[str, Any]:
    """The package version and, in a git checkout, the commit (and whether the tree had changes)."""
    from reki_core import __version__
    from reki_core.config import PROJECT_ROOT

    info: dict[str, Any] = {"package_version": __version__, "git_sha": None, "git_dirty": None}
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True,
                                         text=True, timeout=5, check=True).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT,
                                capture_output=True, text=True, timeout=5, check=True).stdout
        info["git_dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass  # not a git checkout (e.g. an installed wheel): the package version still says what ran
    return info


def failed_gates(gates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [g for g in gates if not g.get("success", False)]


# ---------------------------------------------------------------- latest pointer


def _order_key(pointer: dict[str, Any]) -> tuple[str, str, str]:
    # Forward means a later data date; a rerun of the same date wins when its manifest is newer.
    return (pointer["dt"], pointer["created_at"], pointer["version"])


def read_latest(store: ObjectStore, scenario: str) -> tuple[dict[str, Any] | None, str | None]:
    """The `_LATEST.json` pointer and its ETag (None, None before the first publish)."""
    return store.get_json(latest_key(scenario), missing_ok=True)


def advance_latest(store: ObjectStore, scenario: str, pointer: dict[str, Any], max_attempts: int = 50) -> dict[str, Any]:
    """Move `_LATEST.json` to `pointer` unless it already points at a newer version (compare-and-swap).

    Returns {"moved": bool, "latest": the pointer in force afterwards}.
    """
    key = latest_key(scenario)
    body = json.dumps(pointer, indent=2, sort_keys=True).encode()
    for attempt in range(max_attempts):
        current, etag = read_latest(store, scenario)
        if current is not None and _order_key(current) >= _order_key(pointer):
            return {"moved": current["version"] == pointer["version"], "latest": current}
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            store.put(key, body, **condition)
        except ObjectStoreError as exc:
            if exc.code not in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                raise
            time.sleep(random.uniform(0.01, 0.05) * (attempt + 1))  # another publisher moved it: re-read
            continue
        # Re-read: a store that ignored the condition would show another publisher's write here.
        after, _ = read_latest(store, scenario)
        if after is not None and _order_key(after) >= _order_key(pointer):
            return {"moved": after["version"] == pointer["version"], "latest": after}
    raise PublishError(f"could not move {store.access.uri(key)} to {pointer['version']} after {max_attempts} attempts")


# ---------------------------------------------------------------- manifest


def read_manifest(store: ObjectStore, scenario: str, version: str) -> dict[str, Any] | None:
    manifest, _ = store.get_json(version_prefix(scenario, _normalise_version(version)) + MANIFEST, missing_ok=True)
    return manifest


def list_versions(store: ObjectStore, scenario: str) -> dict[str, dict[str, Any]]:
    """Every version folder: its objects, whether it has a manifest, and when it was last written."""
    prefix = vectors_prefix(scenario)
    versions: dict[str, dict[str, Any]] = {}
    for obj in store.list(prefix):
        rest = obj["Key"][len(prefix):]
        if not rest.startswith("v=") or "/" not in rest:
            continue
        name = rest[2:].split("/", 1)[0]
        entry = versions.setdefault(name, {"keys": [], "complete": False, "last_modified": obj["LastModified"]})
        entry["keys"].append(obj["Key"])
        if obj["Key"].endswith("/" + MANIFEST):
            entry["complete"], entry["published_at"] = True, obj["LastModified"]
        entry["last_modified"] = max(entry["last_modified"], obj["LastModified"])
    return versions


def object_name(name: str, sha256: str) -> str:
    """`user_vectors.parquet` -> `user_vectors.<first 16 hex digits of its sha256>.parquet`."""
    stem, dot, suffix = name.partition(".")
    return f"{stem}.{sha256[:16]}{dot}{suffix}"


def _put_manifest(store: ObjectStore, key: str, body: bytes) -> None:
    # If-None-Match: a published version is immutable, never overwritten in place.
    store.put(key, body, IfNoneMatch="*", ContentType="application/json")


# ---------------------------------------------------------------- publish


def publish_version(cfg, day: str | dt.date, run_id: str, files: dict[str, str | Path | bytes],
                    metadata: dict[str, Any] | None = None, *, endpoint_url: str | None = None,
                    access_key: str | None = None, secret_key: str | None = None, bucket: str | None = None,
                    apply_retention_after: bool = True) -> dict[str, Any]:
    """Upload one version, write its manifest last, then move `latest` forward if this version is newest.

    `files` maps object names (user_vectors.parquet and item_vectors.parquet required; adaptor.pt,
    model_card.*, run_report.* ...) to a local path or bytes. `metadata` goes into the manifest:
    `gates` (list of gate summaries; any failed gate refuses the publish), `source_partitions`,
    `metrics`, `model_version`, and anything else the run wants recorded.
    Returns {"version", "uri", "manifest_uri", "latest_moved", "latest", "retention", "manifest"}.
    """
    metadata = dict(metadata or {})
    access = resolve_s3_access(cfg, endpoint_url=endpoint_url, access_key=access_key, secret_key=secret_key,
                               bucket=bucket)
    store = ObjectStore(access)
    scenario = cfg.scenario.name
    version = version_name(day, run_id)
    prefix = version_prefix(scenario, version)

    clashes = sorted(_COMPUTED_KEYS & metadata.keys())
    if clashes:
        raise PublishError(f"metadata keys {clashes} are computed by publish_version; remove them")
    missing = [n for n in VECTOR_FILES if n not in files]
    if missing:
        raise PublishError(f"version {version}: required files {missing} are missing (given {sorted(files)})")
    bad_names = [n for n in files if not _FILE_NAME_RE.match(n) or n in (MANIFEST, LATEST)]
    if bad_names:
        raise PublishError(f"file names {bad_names} are not allowed (plain names; '{MANIFEST}' is written by publish)")
    gates = list(metadata.get("gates", []))
    if failed_gates(gates):
        names = [f"{g.get('gate')} on {g.get('dataset')}" for g in failed_gates(gates)]
        raise PublishError(f"version {version} not published: quality gates failed: {', '.join(names)}")

    payloads = {name: _source(src) for name, src in files.items()}
    if QUALITY_SUMMARY not in payloads:
        summary = {"dt": as_date(day).isoformat(), "run_id": run_id, "all_passed": True, "gates": gates}
        payloads[QUALITY_SUMMARY] = json.dumps(summary, indent=2, sort_keys=True, default=str).encode()
    described = {name: describe_vectors(name, payloads[name], cfg.lake.batch_rows) for name in VECTOR_FILES}

    store.check_readable(vectors_prefix(scenario))
    existing = read_manifest(store, scenario, version)
    file_entries = {}
    for name, data in payloads.items():
        sha, size = _sha256_and_size(data)
        file_entries[name] = {"key": prefix + object_name(name, sha), "size": size, "sha256": sha}
    if existing is not None:
        return _republish_existing(store, cfg, version, existing, file_entries, apply_retention_after)

    for name, data in payloads.items():
        with contextlib.nullcontext(data) if isinstance(data, bytes) else data.open("rb") as body:
            store.put(file_entries[name]["key"], body, Metadata={"sha256": file_entries[name]["sha256"]})

    model_versions = sorted({v for d in described.values() for v in d["model_versions"]})
    manifest = {
        "format_version": MANIFEST_FORMAT,
        "scenario": scenario,
        "dt": as_date(day).isoformat(),
        "run_id": run_id,
        "version": version,
        "uri": access.uri(prefix),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="microseconds"),
        "files": file_entries,
        "row_counts": {VECTOR_FILES[n]: d["rows"] for n, d in described.items()},
        "vector_dim": {VECTOR_FILES[n]: d["dim"] for n, d in described.items()},
        "has_group_vectors": any(k.endswith("_group") for d in described.values() for k in d["kinds"]),
        "run_report_files": sorted(n for n in payloads if n.startswith("run_report")),
        "model_version": model_versions[0] if len(model_versions) == 1 else (model_versions or None),
        "llm": {"backend": cfg.llm.backend, "model_id": cfg.llm.engine.model_id,
                "is_smoke_model": cfg.llm.is_smoke_model, "sampling": cfg.llm.sampling.model_dump()},
        "template_version": cfg.scenario.template_version,
        "encoder": cfg.encoding.encoder,
        "source_partitions": {},
        "metrics": {},
        "gates": gates,
        "code_version": code_version(),
    }
    manifest.update({k: v for k, v in metadata.items() if k != "gates"})
    manifest_body = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
    manifest_key = prefix + MANIFEST
    _put_manifest(store, manifest_key, manifest_body)

    # `latest` may only point at a manifest that reads back intact.
    readback, _ = store.get(manifest_key)
    if readback != manifest_body:
        raise PublishError(f"{access.uri(manifest_key)} did not read back as written; latest not moved")
    return _finish(store, cfg, manifest, sha256_hex(manifest_body), apply_retention_after)


def _republish_existing(store, cfg, version, existing, file_entries, apply_retention_after) -> dict[str, Any]:
    """A retried publish of the same dt and run: same content is a no-op, different content is refused.

    The run report is rewritten by every try (its timings differ), so it does not count: the version
    keeps the report it was published with.
    """
    published = {n: e["sha256"] for n, e in existing["files"].items() if not n.startswith("run_report")}
    wanted = {n: e["sha256"] for n, e in file_entries.items() if not n.startswith("run_report")}
    if published != wanted:
        changed = sorted(n for n in set(published) | set(wanted) if published.get(n) != wanted.get(n))
        raise PublishError(f"version {version} is already published with different content ({changed}); "
                           f"versions are immutable: publish under a new run_id")
    body, _ = store.get(version_prefix(cfg.scenario.name, version) + MANIFEST)
    return _finish(store, cfg, existing, sha256_hex(body), apply_retention_after)


def _finish(store, cfg, manifest, manifest_sha256, apply_retention_after) -> dict[str, Any]:
    scenario = manifest["scenario"]
    manifest_key = version_prefix(scenario, manifest["version"]) + MANIFEST
    pointer = {"version": manifest["version"], "dt": manifest["dt"], "run_id": manifest["run_id"],
               "created_at": manifest["created_at"], "manifest_key": manifest_key,
               "manifest_uri": store.access.uri(manifest_key), "manifest_sha256": manifest_sha256,
               "updated_at": dt.datetime.now(dt.UTC).isoformat()}
    moved = advance_latest(store, scenario, pointer)
    retention = (apply_retention(cfg, store=store, protect=[manifest["version"]])
                 if apply_retention_after else None)
    return {"version": manifest["version"], "uri": manifest["uri"], "manifest_uri": pointer["manifest_uri"],
            "latest_moved": moved["moved"], "latest": moved["latest"], "retention": retention, "manifest": manifest}


# ---------------------------------------------------------------- retention


def apply_retention(cfg, *, store: ObjectStore | None = None, protect: list[str] = (), now: dt.datetime | None = None,
                    endpoint_url: str | None = None, access_key: str | None = None, secret_key: str | None = None,
                    bucket: str | None = None) -> dict[str, list[str]]:
    """Keep the newest `keep_versions` complete versions, pinned ones, `latest` and `protect`; delete the rest
    and any half-written version (no manifest) untouched for more than a day.
    """
    store = store or ObjectStore(resolve_s3_access(cfg, endpoint_url=endpoint_url, access_key=access_key,
                                                   secret_key=secret_key, bucket=bucket))
    scenario = cfg.scenario.name
    now = now or dt.datetime.now(dt.UTC)
    versions = list_versions(store, scenario)
    latest, _ = read_latest(store, scenario)
    keep = {_normalise_version(v) for v in cfg.object_store.pinned_versions} | {_normalise_version(v) for v in protect}
    if latest:
        keep.add(latest["version"])
    # Newest = latest data date, then latest manifest (a rerun of a date is newer than the first run).
    complete = sorted((name for name, v in versions.items() if v["complete"]),
                      key=lambda n: (n[:10], versions[n]["published_at"]), reverse=True)
    keep.update(complete[:cfg.object_store.keep_versions])

    deleted, half_written = [], []
    for name, info in sorted(versions.items()):
        if name in keep:
            continue
        if info["complete"]:
            deleted.append(name)
        elif now - info["last_modified"] > HALF_WRITTEN_MAX_AGE:
            half_written.append(name)
    for name in deleted + half_written:
        keys = versions[name]["keys"]
        # Manifest first: the version stops existing for consumers before its files go.
        manifest_keys = [k for k in keys if k.endswith("/" + MANIFEST)]
        store.delete_many(manifest_keys)
        store.delete_many([k for k in keys if k not in manifest_keys])
    kept = sorted(n for n in versions if n not in deleted and n not in half_written)
    return {"kept": kept, "deleted": deleted, "deleted_half_written": half_written}


# ---------------------------------------------------------------- from the lake


def collect_gate_results(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Gate summaries (dicts with 'gate' and 'success', as `GateResult.summary()`) held in a step record's
    top-level fields or lists, each tagged with its step (the same rule as the run report)."""
    found = []
    for step in steps:
        for value in step.values():
            for candidate in value if isinstance(value, list) else [value]:
                if isinstance(candidate, dict) and "gate" in candidate and "success" in candidate:
                    found.append({"step": step.get("step"), **candidate})
    return found


_LINEAGE_DATASETS = ["raw/interactions", "features/items", "features/user_history", "features/knowledge_versions",
                     "features/ctr_samples",
                     "features/clusters", "prompts", "knowledge/assigned", "features/knowledge_vectors",
                     "vectors/augmented"]


def publish_with_report(cfg, day: str | dt.date, run_id: str, **store) -> dict[str, Any]:
    """What the DAG's publish task does: the run report, written to this process's scratch folder, then
    `publish_from_lake` (with `store`: its endpoint, identity, bucket) carrying it, so the report lives in the
    published version on the object store and on no host's disk."""
    import tempfile

    from reki_core.report import write_run_report
    from reki_core.storage.lake import lake_of

    day = as_date(day)
    with tempfile.TemporaryDirectory(prefix=f"reki-report-{day.isoformat()}-") as scratch:
        report = write_run_report(lake_of(cfg), day, scratch)
        return publish_from_lake(cfg, day, run_id, **store, extra_files={Path(p).name: Path(p) for p in report.values()})


def publish_from_lake(cfg, day: str | dt.date, run_id: str, *, endpoint_url: str | None = None,
                      access_key: str | None = None, secret_key: str | None = None, bucket: str | None = None,
                      extra_files: dict[str, str | Path | bytes] | None = None) -> dict[str, Any]:
    """Gather day D's augmented vectors, the model's registry files and the run's gate results, then publish.

    Reads `vectors/augmented/dt=D/` (entity_kind, entity_id, vector, model_version), every file of
    `models/registry/<model_version>/` (adaptor.pt required, plus backbone.pt, feature_map.json and the
    model card, whose test metrics and evaluation gate go into the manifest's `metrics`), and
    `_runs/dt=D/*.json` (step records and gate summaries). `extra_files` adds more, e.g. the run report:
    `{p.name: p for p in write_run_report(lake, D, out_dir).values()}`. The vectors go through a scratch folder
    record batch by record batch (`lake.batch_rows`), so memory holds a batch, never the day's vectors.
    """
    from reki_core.storage.lake import lake_of

    lake = lake_of(cfg)
    if not lake.has_partition("vectors/augmented", day):
        raise PublishError(f"{lake.describe('vectors/augmented', day)}: no augmented vectors "
                           f"for {as_date(day)}; the encoding/model step has not written them")
    if "model_version" not in lake.column_names("vectors/augmented"):
        raise PublishError(f"vectors/augmented/dt={as_date(day)}: column 'model_version' is missing")
    with tempfile.TemporaryDirectory(prefix=f"reki-publish-{as_date(day).isoformat()}-") as scratch:
        files, model_versions = _write_vector_files(lake, as_date(day), cfg.lake.batch_rows, Path(scratch))
        if len(model_versions) != 1:
            raise PublishError(f"vectors/augmented/dt={as_date(day)}: column 'model_version' must hold one version, "
                               f"has {model_versions}")
        return _publish_with_registry(cfg, lake, day, run_id, files, model_versions[0], extra_files,
                                      endpoint_url=endpoint_url, access_key=access_key, secret_key=secret_key,
                                      bucket=bucket)


def _write_vector_files(lake, day: dt.date, batch_rows: int, folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Day D's augmented vectors as `VECTOR_FILES` in `folder` (a kind's group vectors in its file), written batch by
    batch; and the model versions they name."""
    columns = lake.column_names("vectors/augmented")
    # Plain strings and float32 lists, whatever widths the table's reader gives.
    schema = pa.schema([pa.field(f.name, pa.list_(pa.float32()) if f.name == "vector" else
                                 pa.string() if pa.types.is_string(f.type) or pa.types.is_large_string(f.type) else f.type)
                        for f in lake.load_table("vectors/augmented").schema().as_arrow() if f.name in columns])
    paths = {name: folder / name for name in VECTOR_FILES}
    model_versions: set = set()
    writers = {name: pq.ParquetWriter(path, schema) for name, path in paths.items()}
    try:
        for batch in lake.read_batches("vectors/augmented", day, schema.names, batch_rows):
            batch = batch.cast(schema)
            model_versions.update(pc.unique(batch.column("model_version")).to_pylist())
            for name, kind in VECTOR_FILES.items():
                part = batch.filter(pc.starts_with(batch.column("entity_kind"), kind))
                if part.num_rows:
                    writers[name].write_batch(part)
    finally:
        for writer in writers.values():
            writer.close()
    return paths, sorted(str(v) for v in model_versions)


def _publish_with_registry(cfg, lake, day, run_id: str, files: dict[str, str | Path | bytes], model_version: str,
                           extra_files: dict[str, str | Path | bytes] | None, **store) -> dict[str, Any]:
    """`publish_from_lake` once the vector files are written: the model's registry files, the gates, then publish."""
    from reki_core.runlog import read_steps

    files = dict(files)
    registry = f"{lake.root}/models/registry/{model_version}"
    if not lake.fs.exists(f"{registry}/adaptor.pt"):
        raise PublishError(f"{lake.uri_of(registry)}/adaptor.pt not found: the model step did not register "
                           f"model version {model_version}")
    metrics: dict[str, Any] = {}
    for path in lake.fs.find(registry):
        name = path.rsplit("/", 1)[-1]
        with lake.fs.open(path, "rb") as fh:
            files[name] = fh.read()
        if name == "model_card.json":
            card = json.loads(files[name])
            metrics = {k: card[k] for k in ("test", "auc_gain_vs_no_knowledge", "gate", "training") if k in card}
    files.update(extra_files or {})

    steps = read_steps(lake, day)
    lineage, snapshots = {}, {}
    for dataset in _LINEAGE_DATASETS:
        latest_day = lake.latest_partition(dataset, upto=day)
        if latest_day is not None:
            lineage[dataset] = latest_day.isoformat()
        if lake.is_table(dataset) and (table := lake.load_table(dataset)) is not None:
            # The version read: time travel to it (`snapshot_id`) finds these inputs again, whatever came after.
            snapshots[dataset] = {"table": lake.table_name(dataset), "snapshot_id": table.current_snapshot().snapshot_id}
    metadata = {
        "gates": collect_gate_results(steps),
        "source_partitions": lineage,
        "source_snapshots": snapshots,
        "metrics": metrics,
        "steps": [{k: s.get(k) for k in ("step", "started_at", "seconds") if k in s} for s in steps],
        "lake_uri": lake.uri,
    }
    from reki_core.runlog import timed_step

    with timed_step(lake, day, "publish") as record:
        result = publish_version(cfg, day, run_id, files, metadata, **store)
        record.update({"version": result["version"], "uri": result["uri"], "latest_moved": result["latest_moved"],
                       "files": len(files), "model_version": model_version})
    return result
