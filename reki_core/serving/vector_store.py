"""The lookup client consumers use: published augmented vectors, verified, in memory, O(1) per id.

    store = VectorStore.from_config(load_config())   # AWS_* env: a read-only identity is enough
    users, items = store.lookup(["196", "186"], ["242", "302"])

`VectorStore` reads `_LATEST.json` (or a pinned version), then the version's manifest, downloads
each file and checks its size and sha256 against the manifest before anything is served. Unknown
ids get the group's vector when the caller names a group the version has a vector for, else zeros;
both cases are counted. `refresh()` loads a newer `latest` completely aside and swaps it in with one
reference assignment, so a reader sees the old version or the new one, never a half-loaded store.
"""

from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pyarrow.parquet as pq

from reki_core.storage.publish import (MANIFEST, VECTOR_FILES, latest_key, read_latest, sha256_hex,
                                       version_prefix)
from reki_core.storage.s3_access import ObjectStore, S3Access, resolve_s3_access


class VectorStoreError(RuntimeError):
    """No usable version: none published, or a file failed its manifest check."""


class ChecksumMismatch(VectorStoreError):
    """A downloaded object does not match the size or sha256 the manifest recorded."""


@dataclass(frozen=True)
class EntityVectors:
    """One tower's vectors: row `len(ids)` of `matrix` is the zero fallback."""

    row_of: dict[str, int]
    matrix: np.ndarray
    group_row_of: dict[str, int]

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def __len__(self) -> int:
        return len(self.row_of)


@dataclass(frozen=True)
class LoadedVersion:
    version: str
    manifest: dict[str, Any]
    users: EntityVectors
    items: EntityVectors


@dataclass
class LookupCounts:
    """How many ids were served from their own vector, their group's vector, or zeros."""

    found: int = 0
    group_fallback: int = 0
    zero_fallback: int = 0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)


def _verified(store: ObjectStore, key: str, expected: dict[str, Any]) -> bytes:
    data, _ = store.get(key)
    if len(data) != expected["size"] or sha256_hex(data) != expected["sha256"]:
        raise ChecksumMismatch(
            f"{store.access.uri(key)}: size {len(data)} sha256 {sha256_hex(data)} does not match the manifest "
            f"(size {expected['size']} sha256 {expected['sha256']}); the object is corrupted or was replaced"
        )
    return data


def _entity_vectors(name: str, data: bytes, kind: str) -> EntityVectors:
    table = pq.read_table(io.BytesIO(data), columns=["entity_kind", "entity_id", "vector"])
    kinds = table.column("entity_kind").to_pylist()
    ids = [str(i) for i in table.column("entity_id").to_pylist()]
    vectors = table.column("vector").combine_chunks()
    dim = len(vectors[0]) if len(vectors) else 0
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if flat.size != dim * len(ids):
        raise VectorStoreError(f"{name}: column 'vector' rows do not all have {dim} values")
    stacked = flat.reshape(len(ids), dim)
    entity_rows = [i for i, k in enumerate(kinds) if k == kind]
    group_rows = [i for i, k in enumerate(kinds) if k == f"{kind}_group"]
    order = entity_rows + group_rows
    # Entities first, then groups, then one zero row that unknown ids index into.
    matrix = np.vstack([stacked[order], np.zeros((1, dim), dtype=np.float32)])
    matrix.setflags(write=False)
    row_of = {ids[i]: r for r, i in enumerate(entity_rows)}
    group_row_of = {ids[i]: len(entity_rows) + r for r, i in enumerate(group_rows)}
    return EntityVectors(row_of, matrix, group_row_of)


def _checked_manifest(uri: str, body: bytes, scenario: str, version: str) -> dict:
    """The manifest, checked to be the one asked for and to list what a load needs; errors name it."""
    try:
        manifest = json.loads(body)
    except json.JSONDecodeError as exc:
        raise VectorStoreError(f"{uri}: not valid JSON ({exc}); the manifest was corrupted") from None
    if not isinstance(manifest, dict):
        raise VectorStoreError(f"{uri}: not a manifest (a JSON object expected)")
    for field in ("version", "scenario", "files", "row_counts"):
        if field not in manifest:
            raise VectorStoreError(f"{uri}: field '{field}' is missing")
    if (manifest["version"], manifest["scenario"]) != (version, scenario):
        raise VectorStoreError(f"{uri}: describes version {manifest['version']!r} of scenario {manifest['scenario']!r}, "
                               f"not {version!r} of {scenario!r}")
    missing = [name for name in VECTOR_FILES if name not in manifest["files"]]
    if missing:
        raise VectorStoreError(f"{uri}: field 'files' does not list {missing}")
    return manifest


def load_version(store: ObjectStore, scenario: str, version: str | None = None) -> LoadedVersion:
    """Download and verify one version (latest when `version` is None)."""
    if version is None:
        pointer, _ = read_latest(store, scenario)
        if pointer is None:
            raise VectorStoreError(f"{store.access.uri(latest_key(scenario))} does not exist: nothing published yet")
        version = pointer["version"]
        manifest_body, _ = store.get(pointer["manifest_key"])
        if sha256_hex(manifest_body) != pointer["manifest_sha256"]:
            raise ChecksumMismatch(f"{store.access.uri(pointer['manifest_key'])}: sha256 does not match "
                                   f"{store.access.uri(latest_key(scenario))}; the manifest was corrupted or replaced")
        manifest_key = pointer["manifest_key"]
    else:
        version = version[2:] if version.startswith("v=") else version
        manifest_key = version_prefix(scenario, version) + MANIFEST
        manifest_body, _ = store.get(manifest_key)
    manifest = _checked_manifest(store.access.uri(manifest_key), manifest_body, scenario, version)
    files = manifest["files"]
    towers = {}
    for name, kind in VECTOR_FILES.items():
        data = _verified(store, files[name]["key"], files[name])
        towers[kind] = _entity_vectors(name, data, kind)
        if len(towers[kind]) != manifest["row_counts"][kind] - len(towers[kind].group_row_of):
            raise VectorStoreError(f"{name}: {len(towers[kind])} {kind} rows, manifest says {manifest['row_counts'][kind]}")
    # The other files (adaptor, model card, quality summary) are verified too: a version is whole or unusable.
    for name, entry in files.items():
        if name not in VECTOR_FILES:
            _verified(store, entry["key"], entry)
    return LoadedVersion(version, manifest, towers["user"], towers["item"])


class VectorStore:
    """In-memory published vectors with O(1) batch lookups and gap-free refresh."""

    def __init__(self, access: S3Access, scenario: str, version: str | None = None):
        self._objects = ObjectStore(access)
        self.scenario = scenario
        self.pinned_version = version
        self._refresh_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self.counts = LookupCounts()
        self._loaded = load_version(self._objects, scenario, version)

    @classmethod
    def from_config(cls, cfg, version: str | None = None, *, endpoint_url: str | None = None,
                    access_key: str | None = None, secret_key: str | None = None,
                    bucket: str | None = None) -> "VectorStore":
        access = resolve_s3_access(cfg, endpoint_url=endpoint_url, access_key=access_key, secret_key=secret_key,
                                   bucket=bucket)
        return cls(access, cfg.scenario.name, version)

    # ------------------------------------------------------------ what is loaded
    @property
    def version(self) -> str:
        return self._loaded.version

    @property
    def manifest(self) -> dict[str, Any]:
        return self._loaded.manifest

    @property
    def user_dim(self) -> int:
        return self._loaded.users.dim

    @property
    def item_dim(self) -> int:
        return self._loaded.items.dim

    # ------------------------------------------------------------ lookups
    def lookup(self, user_ids: Sequence[str], item_ids: Sequence[str], *, user_groups: Sequence[str | None] | None = None,
               item_groups: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """User and item vectors (float32, one row per id) from the same version."""
        loaded = self._loaded  # one read: both towers come from one version even if refresh() swaps meanwhile
        return (self._rows(loaded.users, "user", user_ids, user_groups),
                self._rows(loaded.items, "item", item_ids, item_groups))

    def lookup_users(self, user_ids: Sequence[str], groups: Sequence[str | None] | None = None) -> np.ndarray:
        return self._rows(self._loaded.users, "user", user_ids, groups)

    def lookup_items(self, item_ids: Sequence[str], groups: Sequence[str | None] | None = None) -> np.ndarray:
        return self._rows(self._loaded.items, "item", item_ids, groups)

    def _rows(self, table: EntityVectors, kind: str, ids: Sequence[str], groups: Sequence[str | None] | None) -> np.ndarray:
        zero_row = len(table.matrix) - 1
        row_of = table.row_of
        rows = np.fromiter((row_of.get(str(i), -1) for i in ids), dtype=np.int64, count=len(ids))
        unknown = np.flatnonzero(rows < 0)
        group_hits = 0
        if len(unknown):
            if groups is not None:
                if len(groups) != len(ids):
                    raise ValueError(f"{kind} groups: {len(groups)} given for {len(ids)} ids")
                for position in unknown:
                    group_row = table.group_row_of.get(str(groups[position]), -1) if groups[position] is not None else -1
                    rows[position] = group_row if group_row >= 0 else zero_row
                    group_hits += group_row >= 0
            else:
                rows[unknown] = zero_row
        self._count(kind, len(ids) - len(unknown), group_hits, len(unknown) - group_hits)
        return table.matrix[rows]

    def _count(self, kind: str, found: int, group: int, zero: int) -> None:
        with self._count_lock:
            self.counts.found += found
            self.counts.group_fallback += group
            self.counts.zero_fallback += zero
            per_kind = self.counts.by_kind.setdefault(kind, {"found": 0, "group_fallback": 0, "zero_fallback": 0})
            per_kind["found"] += found
            per_kind["group_fallback"] += group
            per_kind["zero_fallback"] += zero

    # ------------------------------------------------------------ refresh
    def refresh(self) -> bool:
        """Re-read `latest`; when it names another version, load it fully and swap. True when swapped."""
        if self.pinned_version is not None:
            return False
        with self._refresh_lock:
            pointer, _ = read_latest(self._objects, self.scenario)
            if pointer is None or pointer["version"] == self._loaded.version:
                return False
            self._loaded = load_version(self._objects, self.scenario)  # one assignment: readers never see a gap
            return True
