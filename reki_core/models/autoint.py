"""AutoInt: multi-head self-attention over fields; augmented vectors become two extra fields of embedding
size (user tower, item tower; method section 4)."""

from __future__ import annotations

import torch
from torch import nn

from reki_core.models.base import NUM_FLAT_FIELDS, Backbone
from reki_core.models.layers import MultiHeadSelfAttention


class AutoInt(Backbone):
    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int = 32, augmented_dim: int = 0,
                 num_attention_layers: int = 2, num_heads: int = 2, attention_dim: int = 32, dropout: float = 0.1):
        super().__init__(vocab_sizes, embedding_dim, augmented_dim)
        if augmented_dim % 2:
            raise ValueError(f"augmented_dim {augmented_dim} must be even (user half + item half)")
        # One projection per tower half, so each becomes a field of embedding size.
        self.augmented_fields = nn.ModuleList(nn.Linear(augmented_dim // 2, embedding_dim) for _ in range(2)) \
            if augmented_dim else None
        num_fields = NUM_FLAT_FIELDS + (2 if augmented_dim else 0)
        dims = [embedding_dim] + [attention_dim] * num_attention_layers
        self.attention = nn.Sequential(*(MultiHeadSelfAttention(dims[i], dims[i + 1], num_heads, dropout)
                                         for i in range(num_attention_layers)))
        self.head = nn.Linear(num_fields * dims[-1], 1)

    def logits(self, batch, augmented):
        fields = self.flat_fields(batch)
        if augmented is not None:
            halves = augmented.chunk(2, dim=-1)
            extra = [proj(h) for proj, h in zip(self.augmented_fields, halves)]
            fields = torch.cat([fields, torch.stack(extra, 1)], 1)
        return self.head(self.attention(fields).flatten(1)).squeeze(-1)
