"""What identifies a model folder's contents (encoder weights, LLM weights), for the caches keyed on models."""

from __future__ import annotations

import hashlib
from pathlib import Path


def folder_fingerprint(folder: Path, sample_bytes: int | None = None) -> str:
    """sha256 over the names, sizes and contents of every file in a model folder (weights, config, tokenizer).

    With `sample_bytes`, a file larger than three samples contributes its first, middle and last
    `sample_bytes` only: multi-GB LLM weights are fingerprinted in milliseconds, and a fine-tune (or any
    re-training) changes every region of a weights file, so the samples still tell the weights apart.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}\0{size}\0".encode())
        with path.open("rb") as fh:
            if sample_bytes is None or size <= 3 * sample_bytes:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
                continue
            for offset in (0, (size - sample_bytes) // 2, size - sample_bytes):
                fh.seek(offset)
                digest.update(fh.read(sample_bytes))
    return digest.hexdigest()
