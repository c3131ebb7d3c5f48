"""HEIN, REKI's hybrid-expert adaptor (method section 3).

Two towers (user reasoning, item facts). `num_shared_experts` experts are used by both towers and
`num_dedicated_experts` belong to each tower; every expert is an MLP input -> hidden -> output with
ReLU and dropout; each tower has a softmax gate over its S + D experts. The augmented vector is
[user tower output, item tower output] (2 x expert_output_dim).
"""

from __future__ import annotations

import torch
from torch import nn

from reki_core.models.layers import MLP

TOWERS = ("user", "item")


class HybridExpertAdaptor(nn.Module):
    def __init__(self, input_dim: int, num_shared_experts: int = 2, num_dedicated_experts: int = 5,
                 expert_hidden_dim: int = 128, expert_output_dim: int = 32, dropout: float = 0.1):
        super().__init__()
        if num_shared_experts + num_dedicated_experts < 1:
            raise ValueError("the adaptor needs at least one expert (num_shared_experts + num_dedicated_experts)")
        self.input_dim = input_dim
        self.output_dim = expert_output_dim

        def expert() -> MLP:
            # ReLU + dropout after the output too: an expert's output is a hidden representation.
            return MLP(input_dim, [expert_hidden_dim, expert_output_dim], dropout)

        self.shared_experts = nn.ModuleList(expert() for _ in range(num_shared_experts))
        self.dedicated_experts = nn.ModuleDict(
            {tower: nn.ModuleList(expert() for _ in range(num_dedicated_experts)) for tower in TOWERS})
        self.gates = nn.ModuleDict(
            {tower: nn.Linear(input_dim, num_shared_experts + num_dedicated_experts) for tower in TOWERS})

    @classmethod
    def from_config(cls, model_cfg, input_dim: int) -> "HybridExpertAdaptor":
        return cls(input_dim, model_cfg.num_shared_experts, model_cfg.num_dedicated_experts,
                   model_cfg.expert_hidden_dim, model_cfg.expert_output_dim, model_cfg.dropout)

    def _check(self, x: torch.Tensor, tower: str) -> None:
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(
                f"{tower} knowledge vectors have shape {tuple(x.shape)} but the adaptor expects (batch, {self.input_dim}): "
                "the encoder's dimension does not match the adaptor's input_dim (was the encoder changed "
                "without retraining?)"
            )

    def gate_weights(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """(B, S + D) softmax weights over the tower's experts (shared first)."""
        self._check(x, tower)
        return torch.softmax(self.gates[tower](x), dim=-1)

    def tower(self, tower: str, x: torch.Tensor) -> torch.Tensor:
        """(B, expert_output_dim): the gate-weighted sum of the tower's shared and dedicated experts."""
        weights = self.gate_weights(tower, x)
        experts = list(self.shared_experts) + list(self.dedicated_experts[tower])
        outputs = torch.stack([e(x) for e in experts], dim=1)  # (B, S + D, out)
        return (weights.unsqueeze(-1) * outputs).sum(1)

    def forward(self, user_knowledge: torch.Tensor, item_knowledge: torch.Tensor) -> torch.Tensor:
        """(B, 2 * expert_output_dim) augmented vectors."""
        return torch.cat([self.tower("user", user_knowledge), self.tower("item", item_knowledge)], dim=-1)
