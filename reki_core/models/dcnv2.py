"""DCNv2 (parallel cross + deep); augmented vectors are concatenated to the flat dense input (method section 4)."""

from __future__ import annotations

import torch
from torch import nn

from reki_core.models.base import NUM_FLAT_FIELDS, Backbone
from reki_core.models.layers import MLP, CrossNetworkV2


class DCNv2(Backbone):
    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int = 32, augmented_dim: int = 0,
                 num_cross_layers: int = 3, dnn_hidden_units: list[int] = (256, 128), dropout: float = 0.1):
        super().__init__(vocab_sizes, embedding_dim, augmented_dim)
        input_dim = NUM_FLAT_FIELDS * embedding_dim + augmented_dim
        self.cross = CrossNetworkV2(input_dim, num_cross_layers)
        self.deep = MLP(input_dim, list(dnn_hidden_units), dropout)
        self.head = nn.Linear(input_dim + self.deep.output_dim, 1)

    def logits(self, batch, augmented):
        x0 = self.flat_fields(batch).flatten(1)
        if augmented is not None:
            x0 = torch.cat([x0, augmented], -1)
        return self.head(torch.cat([self.cross(x0), self.deep(x0)], -1)).squeeze(-1)
