"""The trainer: AdamW, binary cross-entropy, early stopping on validation AUC, checkpoint by atomic move.

Model selection sees only the validation split; the test split is evaluated once, after training.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reki_core.models import metrics


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class CTRModel(nn.Module):
    """A backbone, with the adaptor in front of it when trained with knowledge."""

    def __init__(self, backbone: nn.Module, adaptor: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.adaptor = adaptor

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        augmented = None
        if self.adaptor is not None:
            augmented = self.adaptor(batch["user_knowledge"], batch["item_knowledge"])
        return self.backbone(batch, augmented)


def _rows(batch: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v[idx].to(device) for k, v in batch.items()}


class Trainer:
    def __init__(self, model: nn.Module, learning_rate: float = 1e-3, weight_decay: float = 1e-2,
                 batch_size: int = 512, max_epochs: int = 20, patience: int = 3, seed: int = 42,
                 checkpoint_path: str | Path | None = None, device: str = "auto", progress: bool = True):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.generator = torch.Generator().manual_seed(seed)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress

    def train_epoch(self, train: dict[str, torch.Tensor]) -> float:
        self.model.train()
        n = len(train["label"])
        order = torch.randperm(n, generator=self.generator)
        total = 0.0
        for start in range(0, n, self.batch_size):
            rows = _rows(train, order[start:start + self.batch_size], self.device)
            loss = self.loss_fn(self.model(rows), rows["label"])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(rows["label"])
        return total / max(n, 1)

    @torch.no_grad()
    def predict(self, data: dict[str, torch.Tensor]) -> np.ndarray:
        self.model.eval()
        n = len(data["label"])
        out = [torch.sigmoid(self.model(_rows(data, torch.arange(s, min(s + 4096, n)), self.device))).cpu()
               for s in range(0, n, 4096)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    def evaluate(self, data: dict[str, torch.Tensor]) -> dict[str, float]:
        probs = self.predict(data)
        labels = data["label"].numpy()
        return {"auc": metrics.auc(labels, probs), "logloss": metrics.logloss(labels, probs), "rows": int(len(labels))}

    def _save_checkpoint(self) -> None:
        # Write aside then rename: a crash never leaves a truncated checkpoint at the final path.
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.checkpoint_path.parent, suffix=".pt.tmp")
        os.close(fd)
        torch.save(self.model.state_dict(), tmp)
        os.replace(tmp, self.checkpoint_path)

    def fit(self, train: dict[str, torch.Tensor], valid: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Train until validation AUC stops improving for `patience` epochs; keep the best weights."""
        from tqdm.auto import tqdm

        history, best_auc, best_epoch, best_state = [], -np.inf, 0, None
        bar = tqdm(range(1, self.max_epochs + 1), desc="train", unit="epoch", disable=not self.progress)
        for epoch in bar:
            train_loss = self.train_epoch(train)
            valid_metrics = self.evaluate(valid)
            history.append({"epoch": epoch, "train_loss": train_loss, "valid_auc": valid_metrics["auc"],
                            "valid_logloss": valid_metrics["logloss"]})
            bar.set_postfix(loss=f"{train_loss:.4f}", valid_auc=f"{valid_metrics['auc']:.4f}")
            if valid_metrics["auc"] > best_auc:
                best_auc, best_epoch = valid_metrics["auc"], epoch
                best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                if self.checkpoint_path:
                    self._save_checkpoint()
            elif epoch - best_epoch >= self.patience:
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return {"best_epoch": best_epoch, "best_valid_auc": float(best_auc), "epochs_run": len(history),
                "history": history}
