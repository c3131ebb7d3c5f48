"""What identifies a model folder's contents (encoder weights, LLM weights), for the caches keyed on models."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def model_files(folder: Path) -> list[Path]:
    """Every file of a model folder but hidden ones: download tools keep their own state there (e.g.
    `.cache/huggingface/` with download times), which says nothing about the weights."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def folder_fingerprint(folder: Path, cache_file: Path | None = None) -> str:
    """sha256 over the names, sizes and contents of a model folder's files (weights, config, tokenizer).

    Every byte counts: a fine-tune that changes a few tensors changes the fingerprint. With `cache_file`, a
    file whose size, modification time and inode are those of the last call is not read again, so multi-GB
    LLM weights are hashed once per change, not at every call.
    """
    known = json.loads(cache_file.read_text()) if cache_file is not None and cache_file.is_file() else {}
    seen: dict[str, dict] = {}
    digest = hashlib.sha256()
    for path in model_files(folder):
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = known.get(str(path))
        file_hash = entry["sha256"] if entry and entry["stamp"] == stamp else file_sha256(path)
        seen[str(path)] = {"stamp": stamp, "sha256": file_hash}
        digest.update(f"{path.relative_to(folder)}\0{st.st_size}\0{file_hash}\0".encode())
    if cache_file is not None and seen != {k: v for k, v in known.items() if k in seen}:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        partial.write_text(json.dumps({**known, **seen}, indent=1, sort_keys=True))
        os.replace(partial, cache_file)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
