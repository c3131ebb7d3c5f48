"""DeepFM: first-order + FM over the fields, plus a deep part; augmented vectors join the flat dense input
of the deep part (method section 4: concatenated to the flat dense input)."""

from __future__ import annotations

import torch
from torch import nn

from reki_core.models.base import NUM_FLAT_FIELDS, Backbone
from reki_core.models.layers import MLP, FactorizationMachine


class DeepFM(Backbone):
    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int = 32, augmented_dim: int = 0,
                 dnn_hidden_units: list[int] = (256, 128), dropout: float = 0.1):
        super().__init__(vocab_sizes, embedding_dim, augmented_dim)
        self.first_order = nn.Linear(NUM_FLAT_FIELDS * embedding_dim, 1)
        self.fm = FactorizationMachine()
        self.deep = MLP(NUM_FLAT_FIELDS * embedding_dim + augmented_dim, list(dnn_hidden_units), dropout, output_dim=1)

    def logits(self, batch, augmented):
        fields = self.flat_fields(batch)
        flat = fields.flatten(1)
        deep_in = flat if augmented is None else torch.cat([flat, augmented], -1)
        return (self.first_order(flat) + self.fm(fields) + self.deep(deep_in)).squeeze(-1)
