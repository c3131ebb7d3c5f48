"""Dataset assembly: CTR samples + knowledge vectors -> tensors, through a feature map.

The feature map (id vocabularies, history length, knowledge dim, encoder id) is saved beside the
weights: it is the contract between training and inference. Index 0 is padding, 1 is out-of-vocabulary.
A sample's user vector is the one of the knowledge version the sample was joined with
(`knowledge_prompt_hash`, else the user's version with `as_of == knowledge_as_of`); when that version
is not in the lake, the user's newest vector with `as_of < ts` (never knowledge that saw the sample);
otherwise, and for items with no knowledge, a zero vector. `stats` counts each case.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

PAD, OOV = 0, 1
SAMPLE_COLUMNS = ["user_id", "item_id", "ts", "label", "item_genre", "hist_item_ids", "hist_genres", "split",
                  "knowledge_prompt_hash", "knowledge_as_of"]
# Every sample has these (a table keeps a column a later write dropped, as nulls: a missing column reads so).
SAMPLE_VALUES_REQUIRED = ["user_id", "item_id", "ts", "label", "split", "knowledge_as_of"]


class AssemblyError(ValueError):
    """Inputs to training or inference do not fit together; the message names the dataset and column."""


@dataclass
class FeatureMap:
    vocabs: dict[str, list[str]]  # vocab name -> ids in index order (index = position + 2)
    max_hist_len: int
    knowledge_dim: int
    encoder_id: str
    extra: dict[str, Any] = field(default_factory=dict)  # backbone, model args, no-knowledge vectors

    def vocab_sizes(self) -> dict[str, int]:
        return {name: len(ids) + 2 for name, ids in self.vocabs.items()}

    def index(self, vocab: str, values: pd.Series) -> np.ndarray:
        lookup = {v: i + 2 for i, v in enumerate(self.vocabs[vocab])}
        return values.astype(str).map(lookup).fillna(OOV).to_numpy(np.int64, copy=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "FeatureMap":
        return cls(**json.loads(text))


def _as_list(value: Any) -> list:
    return [] if value is None else list(value)


def check_samples(columns: list[str], batches: Iterable[pd.DataFrame], where: str) -> dict[str, dict[str, Any]]:
    """Check the samples' columns (`columns`: the table's), then their required values in one pass over `batches`
    (frames of `SAMPLE_VALUES_REQUIRED`); returns each split's rows and the label values it holds."""
    missing = [c for c in SAMPLE_COLUMNS if c not in columns]
    if missing:
        raise AssemblyError(f"{where}: missing columns {missing}")
    empty: Counter = Counter()
    splits: dict[str, dict[str, Any]] = {}
    for batch in batches:
        empty.update({c: int(batch[c].isna().sum()) for c in SAMPLE_VALUES_REQUIRED})
        for split, labels in batch.groupby(batch["split"].astype(str))["label"]:
            part = splits.setdefault(split, {"rows": 0, "labels": set()})
            part["rows"] += len(labels)
            part["labels"].update(labels.dropna().tolist())
    empty_columns = {c: n for c, n in empty.items() if n}
    if empty_columns:
        raise AssemblyError(f"{where}: missing values (column: rows) {empty_columns}")
    bad_split = sorted(set(splits) - {"train", "valid", "test"})
    if bad_split:
        raise AssemblyError(f"{where}: column split has values {bad_split}, expected train/valid/test")
    return splits


def build_feature_map(train: Iterable[pd.DataFrame], max_hist_len: int, encoder_id: str,
                      knowledge_dim: int) -> FeatureMap:
    """Vocabularies from the training split only (valid/test ids unseen in training map to OOV), gathered in one
    pass over its frames: they hold ids, never the split."""
    users: set[str] = set()
    items: set[str] = set()
    genres: set[str] = set()
    for frame in train:
        users.update(frame["user_id"].astype(str))
        items.update(frame["item_id"].astype(str))
        genres.update(frame["item_genre"].dropna().astype(str))
        for hist_items, hist_genres in zip(frame["hist_item_ids"], frame["hist_genres"]):
            items.update(str(x) for x in _as_list(hist_items))
            genres.update(str(x) for x in _as_list(hist_genres))
    vocabs = {"user": sorted(users), "item": sorted(items), "genre": sorted(genres)}
    return FeatureMap(vocabs, max_hist_len, knowledge_dim, encoder_id)


class KnowledgeIndex:
    """Knowledge vectors by entity: users by (user_id, prompt_hash) over all dates, items by item_id as of D."""

    def __init__(self, vectors: pd.DataFrame, day, encoder_id: str, dim: int):
        self.dim = dim
        self.encoder_id = encoder_id
        vectors = vectors.sort_values("dt", kind="stable")  # newer dates win below
        self.user_by_hash: dict[tuple[str, str], np.ndarray] = {}
        self.user_versions: dict[str, dict[int, np.ndarray]] = {}  # user -> as_of -> vector
        self.item: dict[str, np.ndarray] = {}
        for row in vectors.itertuples(index=False):
            vec = np.asarray(row.vector, dtype=np.float32)
            if row.entity_kind == "user":
                for h in _as_list(row.prompt_hashes):
                    self.user_by_hash[(str(row.entity_id), str(h))] = vec
                if not pd.isna(row.as_of):
                    self.user_versions.setdefault(str(row.entity_id), {})[int(row.as_of)] = vec
            elif row.dt == day:
                self.item[str(row.entity_id)] = vec
        self._sorted_versions = {u: sorted(v) for u, v in self.user_versions.items()}

    def user_vector(self, user_id: str, prompt_hash: Any, knowledge_as_of: Any, ts: int) -> tuple[np.ndarray | None, str]:
        """(vector, how it was found): exact version, an earlier version (as_of < ts), or missing."""
        if isinstance(prompt_hash, str) and (user_id, prompt_hash) in self.user_by_hash:
            return self.user_by_hash[(user_id, prompt_hash)], "exact"
        versions = self.user_versions.get(user_id, {})
        if not pd.isna(knowledge_as_of) and int(knowledge_as_of) in versions:
            return versions[int(knowledge_as_of)], "exact"
        earlier = [a for a in self._sorted_versions.get(user_id, []) if a < ts]
        if earlier:
            return versions[earlier[-1]], "earlier_version"
        return None, "missing"

    @classmethod
    def from_lake(cls, lake, day) -> "KnowledgeIndex":
        """All `features/knowledge_vectors` partitions up to `day` made with the encoder of `day`."""
        from reki_core.encoding import KNOWLEDGE_VECTORS
        from reki_core.storage.lake import as_date

        day = as_date(day)
        today = lake.read_partition(KNOWLEDGE_VECTORS, day)
        if today.empty:
            raise AssemblyError(f"{lake.describe(KNOWLEDGE_VECTORS, day)}: no knowledge vectors")
        encoder_ids = today["encoder_id"].unique().tolist()
        if len(encoder_ids) != 1:
            raise AssemblyError(f"{KNOWLEDGE_VECTORS} dt={day}: column encoder_id mixes encoders {encoder_ids}")
        vectors = lake.read_range(KNOWLEDGE_VECTORS, upto=day)
        # Older dates made with another encoder live in another vector space: never mix them.
        vectors = vectors[vectors["encoder_id"] == encoder_ids[0]]
        dims = {len(v) for v in vectors["vector"]}
        if len(dims) != 1:
            raise AssemblyError(f"{KNOWLEDGE_VECTORS}: column vector has several lengths {sorted(dims)}")
        return cls(vectors, day, encoder_ids[0], dims.pop())


def assemble(samples: pd.DataFrame, fmap: FeatureMap, knowledge: KnowledgeIndex | None) -> dict[str, Any]:
    """Tensors for one split: ids, padded histories, knowledge vectors, labels; plus join statistics."""
    import torch

    n, length = len(samples), fmap.max_hist_len
    hist_items = np.zeros((n, length), np.int64)
    hist_genres = np.zeros((n, length), np.int64)
    item_lookup = {v: i + 2 for i, v in enumerate(fmap.vocabs["item"])}
    genre_lookup = {v: i + 2 for i, v in enumerate(fmap.vocabs["genre"])}
    for r, (items, genres) in enumerate(zip(samples["hist_item_ids"], samples["hist_genres"])):
        items, genres = _as_list(items)[-length:], _as_list(genres)[-length:]  # the most recent ones
        hist_items[r, :len(items)] = [item_lookup.get(str(x), OOV) for x in items]
        hist_genres[r, :len(genres)] = [genre_lookup.get(str(x), OOV) for x in genres]
    batch = {
        "user": torch.from_numpy(fmap.index("user", samples["user_id"])),
        "item": torch.from_numpy(fmap.index("item", samples["item_id"])),
        "item_genre": torch.from_numpy(fmap.index("genre", samples["item_genre"].fillna(""))),
        "hist_items": torch.from_numpy(hist_items),
        "hist_genres": torch.from_numpy(hist_genres),
        "label": torch.from_numpy(samples["label"].to_numpy(np.float32)),
    }
    stats: dict[str, Any] = {"rows": n}
    if knowledge is not None:
        if knowledge.dim != fmap.knowledge_dim:
            raise AssemblyError(f"knowledge vectors have {knowledge.dim} dims, the feature map expects "
                                f"{fmap.knowledge_dim} (encoder {fmap.encoder_id}, got {knowledge.encoder_id})")
        zero = np.zeros(knowledge.dim, np.float32)
        found = [knowledge.user_vector(str(u), h, a, int(t)) for u, h, a, t in zip(
            samples["user_id"], samples["knowledge_prompt_hash"], samples["knowledge_as_of"], samples["ts"])]
        users = [v for v, _ in found]
        items = [knowledge.item.get(str(i)) for i in samples["item_id"]]
        for how in ("exact", "earlier_version", "missing"):
            stats[f"user_knowledge_{how}"] = sum(h == how for _, h in found)
        stats["samples_without_item_knowledge"] = sum(v is None for v in items)
        batch["user_knowledge"] = torch.from_numpy(np.stack([zero if v is None else v for v in users]) if n else
                                                   np.zeros((0, knowledge.dim), np.float32))
        batch["item_knowledge"] = torch.from_numpy(np.stack([zero if v is None else v for v in items]) if n else
                                                   np.zeros((0, knowledge.dim), np.float32))
    return {"batch": batch, "stats": stats}
