"""The model registry in the lake: `models/registry/<version>/` and the `_CURRENT.json` pointer.

A version folder holds adaptor.pt, backbone.pt, feature_map.json, model_card.json, model_card.md.
Every trained version is registered (its card says whether the gate passed); `_CURRENT.json` moves
to a version only when its evaluation gate passed.
"""

from __future__ import annotations

import io
import uuid
from typing import Any

from reki_core.storage.lake import Lake

REGISTRY = "models/registry"
CURRENT = f"{REGISTRY}/_CURRENT.json"
VERSION_FILES = ("adaptor.pt", "backbone.pt", "feature_map.json", "model_card.json", "model_card.md")


class RegistryError(RuntimeError):
    """The registry has no usable model version; the message says which and what to run."""


def version_path(lake: Lake, version: str) -> str:
    return f"{lake.dataset_path(REGISTRY)}/{version}"


def write_version(lake: Lake, version: str, files: dict[str, bytes]) -> str:
    """Write a version folder aside, then move it in place (a rerun of the same version replaces it whole)."""
    missing = [f for f in VERSION_FILES if f not in files]
    if missing:
        raise ValueError(f"model version {version}: files {missing} missing")
    base = lake.dataset_path(REGISTRY)
    staging = f"{base}/_staging-{uuid.uuid4().hex}"
    lake.fs.makedirs(staging, exist_ok=True)
    for name, payload in files.items():
        with lake.fs.open(f"{staging}/{name}", "wb") as fh:
            fh.write(payload)
    lake.replace_folder(staging, version_path(lake, version))
    return version_path(lake, version)


def read_file(lake: Lake, version: str, name: str) -> bytes:
    path = f"{version_path(lake, version)}/{name}"
    if not lake.fs.exists(path):
        raise RegistryError(f"model version {version}: {lake.uri_of(path)} missing")
    with lake.fs.open(path, "rb") as fh:
        return fh.read()


def current_version(lake: Lake) -> dict[str, Any] | None:
    """The `_CURRENT.json` document ({version, dt, test_auc, ...}) or None when nothing passed a gate yet."""
    return lake.read_json(CURRENT)


def set_current(lake: Lake, version: str, payload: dict[str, Any]) -> None:
    # The pointer is written only after the version folder is readable.
    read_file(lake, version, "model_card.json")
    lake.write_json(CURRENT, {"version": version, **payload})


def torch_bytes(state_dict: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


def load_state(lake: Lake, version: str, name: str) -> dict:
    import torch

    return torch.load(io.BytesIO(read_file(lake, version, name)), map_location="cpu", weights_only=True)
