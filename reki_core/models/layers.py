"""Building blocks the backbones and the adaptor compose (torch is imported by whoever imports this module)."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU -> Dropout per hidden layer, then an optional linear output layer."""

    def __init__(self, input_dim: int, hidden_dims: list[int] | tuple[int, ...], dropout: float = 0.0,
                 output_dim: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        dim = input_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout)]
            dim = hidden
        if output_dim is not None:
            layers.append(nn.Linear(dim, output_dim))
            dim = output_dim
        self.net = nn.Sequential(*layers)
        self.output_dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class FeatureEmbedding(nn.Module):
    """One embedding table per vocabulary; index 0 is padding (zero vector), 1 is out-of-vocabulary."""

    def __init__(self, vocab_sizes: dict[str, int], embedding_dim: int):
        super().__init__()
        self.tables = nn.ModuleDict({name: nn.Embedding(size, embedding_dim, padding_idx=0)
                                     for name, size in vocab_sizes.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=1e-2)
            with torch.no_grad():
                table.weight[0].zero_()

    def forward(self, vocab: str, ids: torch.Tensor) -> torch.Tensor:
        return self.tables[vocab](ids)


def masked_mean(seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence axis of (B, L, d) where mask (B, L) is true; zeros for empty rows."""
    m = mask.unsqueeze(-1).to(seq.dtype)
    return (seq * m).sum(1) / m.sum(1).clamp(min=1.0)


class AttentionUnit(nn.Module):
    """DIN's local activation unit: scores each history item against the target, weighted sum (no softmax)."""

    def __init__(self, dim: int, hidden_dims: tuple[int, ...] = (64, 32)):
        super().__init__()
        self.score = MLP(4 * dim, hidden_dims, output_dim=1)

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = target.unsqueeze(1).expand_as(history)
        weights = self.score(torch.cat([q, history, q - history, q * history], dim=-1)).squeeze(-1)
        weights = weights * mask.to(weights.dtype)
        return (weights.unsqueeze(-1) * history).sum(1)


class CrossNetworkV2(nn.Module):
    """DCNv2 cross layers: x_{l+1} = x_0 * (W_l x_l + b_l) + x_l."""

    def __init__(self, input_dim: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(input_dim, input_dim) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x
        return x


class FactorizationMachine(nn.Module):
    """Second-order FM term over field embeddings (B, F, d) -> (B, 1)."""

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(1).pow(2)
        sum_of_square = fields.pow(2).sum(1)
        return 0.5 * (square_of_sum - sum_of_square).sum(-1, keepdim=True)


class MultiHeadSelfAttention(nn.Module):
    """AutoInt's interacting layer: multi-head self-attention over fields with a residual projection and ReLU."""

    def __init__(self, input_dim: int, attention_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if attention_dim % num_heads:
            raise ValueError(f"attention_dim {attention_dim} is not divisible by num_heads {num_heads}")
        self.query = nn.Linear(input_dim, attention_dim, bias=False)
        self.key = nn.Linear(input_dim, attention_dim, bias=False)
        self.value = nn.Linear(input_dim, attention_dim, bias=False)
        self.residual = nn.Linear(input_dim, attention_dim, bias=False)
        self.num_heads = num_heads
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, f, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, f, self.num_heads, -1).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        attn = torch.softmax(q @ k.transpose(-1, -2) / k.shape[-1] ** 0.5, dim=-1)
        out = (self.dropout(attn) @ v).transpose(1, 2).reshape(b, f, -1)
        return torch.relu(out + self.residual(x))
