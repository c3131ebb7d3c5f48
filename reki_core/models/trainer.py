"""The trainer: AdamW, binary cross-entropy, early stopping on validation AUC, checkpoint by atomic move.

Model selection sees only the validation split; the test split is evaluated once, after training. A split is
`Chunks`: assembled record batches that each pass reads again (training.SplitChunks streams them from the lake), so the
trainer holds a shuffle window and a chunk, never a split.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterable, Iterator
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


# A split as assembled record batches (tensors by feature); iterating it again reads them again.
Chunks = Iterable[dict[str, torch.Tensor]]


def _gather(chunks: list[dict[str, torch.Tensor]], starts: torch.Tensor, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows `idx` of `chunks` laid end to end (`starts`: each chunk's first row), in that order, without joining the
    chunks: a window costs its rows once."""
    which = torch.searchsorted(starts, idx, right=True) - 1
    out = {k: torch.empty((len(idx), *v.shape[1:]), dtype=v.dtype) for k, v in chunks[0].items()}
    for c in which.unique().tolist():
        rows = which == c
        for k, v in chunks[c].items():
            out[k][rows] = v[idx[rows] - starts[c]]
    return out


def shuffled_minibatches(chunks: Chunks, batch_size: int, buffer_rows: int,
                         generator: torch.Generator) -> Iterator[dict[str, torch.Tensor]]:
    """Minibatches of `batch_size` rows, shuffled within a window: chunks gather until `buffer_rows` rows, the window
    is permuted and its full minibatches given, the rest waits for the next window. Holds at most a window and a chunk;
    the same chunks and generator state give the same minibatches."""
    pending: list[dict[str, torch.Tensor]] = []
    rows = 0

    def window_batches(final: bool) -> Iterator[dict[str, torch.Tensor]]:
        nonlocal pending, rows
        starts = torch.tensor([0] + [len(c["label"]) for c in pending]).cumsum(0)[:-1]
        order = torch.randperm(rows, generator=generator)
        full = rows if final else rows - rows % batch_size
        for start in range(0, full, batch_size):
            yield _gather(pending, starts, order[start:start + batch_size])
        rest = _gather(pending, starts, order[full:])
        pending, rows = [rest], rows - full

    for chunk in chunks:
        pending.append(chunk)
        rows += len(chunk["label"])
        if rows >= buffer_rows:
            yield from window_batches(final=False)
    if rows:
        yield from window_batches(final=True)


@torch.no_grad()
def predict(model: nn.Module, data: Chunks, device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) of every row: numbers per sample; the features pass chunk by chunk."""
    model.eval()
    probs, labels = [], []
    for chunk in data:
        for s in range(0, len(chunk["label"]), 4096):
            rows = {k: v[s:s + 4096].to(device) for k, v in chunk.items()}
            probs.append(torch.sigmoid(model(rows)).cpu().numpy())
        labels.append(chunk["label"].numpy())
    if not probs:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    return np.concatenate(probs), np.concatenate(labels)


class Trainer:
    def __init__(self, model: nn.Module, learning_rate: float = 1e-3, weight_decay: float = 1e-2,
                 batch_size: int = 512, max_epochs: int = 20, patience: int = 3, seed: int = 42,
                 checkpoint_path: str | Path | None = None, device: str = "auto", progress: bool = True,
                 shuffle_buffer_rows: int = 32768):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.model = model.to(self.device)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.loss_fn = nn.BCEWithLogitsLoss()
        self.batch_size, self.max_epochs, self.patience = batch_size, max_epochs, patience
        self.shuffle_buffer_rows = shuffle_buffer_rows
        self.generator = torch.Generator().manual_seed(seed)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.progress = progress

    def train_epoch(self, train: Chunks) -> float:
        self.model.train()
        total, n = 0.0, 0
        for batch in shuffled_minibatches(train, self.batch_size, self.shuffle_buffer_rows, self.generator):
            rows = {k: v.to(self.device) for k, v in batch.items()}
            loss = self.loss_fn(self.model(rows), rows["label"])
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(rows["label"])
            n += len(rows["label"])
        return total / max(n, 1)

    def predict(self, data: Chunks) -> tuple[np.ndarray, np.ndarray]:
        return predict(self.model, data, self.device)

    def evaluate(self, data: Chunks) -> dict[str, float]:
        probs, labels = self.predict(data)
        return {"auc": metrics.auc(labels, probs), "logloss": metrics.logloss(labels, probs), "rows": int(len(labels))}

    def _save_checkpoint(self) -> None:
        # Write aside then rename: a crash never leaves a truncated checkpoint at the final path.
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.checkpoint_path.parent, suffix=".pt.tmp")
        os.close(fd)
        torch.save(self.model.state_dict(), tmp)
        os.replace(tmp, self.checkpoint_path)

    def fit(self, train: Chunks, valid: Chunks) -> dict[str, Any]:
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
