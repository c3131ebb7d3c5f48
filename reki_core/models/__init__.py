"""CTR backbones, the HEIN adaptor, the trainer and metrics (torch imported lazily by `build_*`)."""

from __future__ import annotations

from typing import Any

BACKBONES = ("din", "dcnv2", "deepfm", "autoint")


def build_backbone(name: str, vocab_sizes: dict[str, int], model_cfg: Any, augmented_dim: int = 0):
    """A backbone by name, its constructor arguments taken from `cfg.model` keys of the same names."""
    from reki_core.models.autoint import AutoInt
    from reki_core.models.dcnv2 import DCNv2
    from reki_core.models.deepfm import DeepFM
    from reki_core.models.din import DIN

    common = dict(vocab_sizes=vocab_sizes, embedding_dim=model_cfg.embedding_dim, augmented_dim=augmented_dim)
    if name == "din":
        return DIN(**common, dnn_hidden_units=model_cfg.dnn_hidden_units, dropout=model_cfg.dropout)
    if name == "dcnv2":
        return DCNv2(**common, num_cross_layers=model_cfg.num_cross_layers,
                     dnn_hidden_units=model_cfg.dnn_hidden_units, dropout=model_cfg.dropout)
    if name == "deepfm":
        return DeepFM(**common, dnn_hidden_units=model_cfg.dnn_hidden_units, dropout=model_cfg.dropout)
    if name == "autoint":
        return AutoInt(**common, num_attention_layers=model_cfg.num_attention_layers, num_heads=model_cfg.num_heads,
                       attention_dim=model_cfg.attention_dim, dropout=model_cfg.dropout)
    raise ValueError(f"model.backbone={name!r}: unknown backbone, expected one of {BACKBONES}")
