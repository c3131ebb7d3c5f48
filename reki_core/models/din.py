"""DIN: target attention over the history; augmented vectors join the final MLP input (method section 4)."""

from __future__ import annotations

import torch

from reki_core.models.base import Backbone
from reki_core.models.layers import MLP, AttentionUnit


class DIN(Backbone):
    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int = 32, augmented_dim: int = 0,
                 dnn_hidden_units: list[int] = (256, 128), dropout: float = 0.1):
        super().__init__(vocab_sizes, embedding_dim, augmented_dim)
        item_dim = 2 * embedding_dim  # item id + genre
        self.attention = AttentionUnit(item_dim)
        self.mlp = MLP(embedding_dim + 2 * item_dim + augmented_dim, list(dnn_hidden_units), dropout, output_dim=1)

    def logits(self, batch, augmented):
        target = torch.cat([self.embedding("item", batch["item"]), self.embedding("genre", batch["item_genre"])], -1)
        history = torch.cat([self.embedding("item", batch["hist_items"]),
                             self.embedding("genre", batch["hist_genres"])], -1)
        interest = self.attention(target, history, batch["hist_items"] > 0)
        parts = [self.embedding("user", batch["user"]), interest, target]
        if augmented is not None:
            parts.append(augmented)
        return self.mlp(torch.cat(parts, -1)).squeeze(-1)
