"""What every CTR backbone shares: the feature fields of a CTR sample and how augmented vectors arrive.

A batch is a dict of tensors (see `reki_core.models.data`): `user`, `item`, `item_genre` (B,) ids,
`hist_items`, `hist_genres` (B, L) ids with 0 as padding. Backbones take `augmented` (B, augmented_dim)
or None; `augmented_dim=0` builds the same backbone without knowledge.
"""

from __future__ import annotations

import torch
from torch import nn

from reki_core.models.layers import FeatureEmbedding, masked_mean

VOCABS = ("user", "item", "genre")
NUM_FLAT_FIELDS = 5  # user, item, item genre, mean history item, mean history genre


class Backbone(nn.Module):
    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int = 32, augmented_dim: int = 0):
        super().__init__()
        missing = [v for v in VOCABS if v not in vocab_sizes]
        if missing:
            raise ValueError(f"vocab_sizes lacks {missing}")
        self.embedding_dim = embedding_dim
        self.augmented_dim = augmented_dim
        self.embedding = FeatureEmbedding({v: vocab_sizes[v] for v in VOCABS}, embedding_dim)

    def _check_augmented(self, augmented: torch.Tensor | None) -> None:
        if self.augmented_dim and (augmented is None or augmented.shape[-1] != self.augmented_dim):
            got = None if augmented is None else tuple(augmented.shape)
            raise ValueError(f"{type(self).__name__} was built for augmented vectors of {self.augmented_dim} dims, got {got}")
        if not self.augmented_dim and augmented is not None:
            raise ValueError(f"{type(self).__name__} was built without knowledge but got augmented vectors")

    def flat_fields(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 5, d) field embeddings; the history is mean-pooled into two fields."""
        mask = batch["hist_items"] > 0
        fields = [
            self.embedding("user", batch["user"]),
            self.embedding("item", batch["item"]),
            self.embedding("genre", batch["item_genre"]),
            masked_mean(self.embedding("item", batch["hist_items"]), mask),
            masked_mean(self.embedding("genre", batch["hist_genres"]), mask),
        ]
        return torch.stack(fields, dim=1)

    def forward(self, batch: dict[str, torch.Tensor], augmented: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) logits."""
        self._check_augmented(augmented)
        return self.logits(batch, augmented)

    def logits(self, batch: dict[str, torch.Tensor], augmented: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError
