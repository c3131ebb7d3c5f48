"""HEIN shapes and gate maths, backbones learning on a tiny config, metrics, the evaluation gate maths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reki_core.config import ModelConfig
from reki_core.models import BACKBONES, build_backbone, metrics
from reki_core.models.adaptor import HybridExpertAdaptor
from reki_core.models.trainer import CTRModel, Trainer, seed_everything, shuffled_minibatches
from reki_core.models.training import evaluation_gate

torch.set_num_threads(1)

TINY = ModelConfig(embedding_dim=8, expert_hidden_dim=16, expert_output_dim=8, dnn_hidden_units=[32, 16],
                   num_cross_layers=2, num_attention_layers=1, num_heads=2, attention_dim=8, dropout=0.0)
VOCABS = {"user": 32, "item": 42, "genre": 6}


def tiny_batch(n: int = 512, knowledge_dim: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ids with a learnable label (depends on user and item parity) and knowledge that carries it too."""
    g = torch.Generator().manual_seed(seed)
    user = torch.randint(2, VOCABS["user"], (n,), generator=g)
    item = torch.randint(2, VOCABS["item"], (n,), generator=g)
    hist = torch.randint(0, VOCABS["item"], (n, 5), generator=g)
    label = ((user % 2) == (item % 2)).float()
    uk = torch.randn(n, knowledge_dim, generator=g)
    ik = torch.randn(n, knowledge_dim, generator=g)
    uk[:, 0], ik[:, 0] = (user % 2) * 2 - 1, (item % 2) * 2 - 1
    return {"user": user, "item": item, "item_genre": item % VOCABS["genre"], "hist_items": hist,
            "hist_genres": hist % VOCABS["genre"], "label": label, "user_knowledge": uk, "item_knowledge": ik}


def test_adaptor_shapes_and_gates_sum_to_one():
    adaptor = HybridExpertAdaptor(input_dim=12, num_shared_experts=2, num_dedicated_experts=5,
                                  expert_hidden_dim=16, expert_output_dim=8, dropout=0.1).eval()
    u, i = torch.randn(7, 12), torch.randn(7, 12)
    assert adaptor(u, i).shape == (7, 16)
    for tower, x in (("user", u), ("item", i)):
        w = adaptor.gate_weights(tower, x)
        assert w.shape == (7, 7)  # S + D experts per tower
        assert torch.all(w > 0)
        torch.testing.assert_close(w.sum(-1), torch.ones(7))
    assert len(adaptor.shared_experts) == 2
    assert all(len(adaptor.dedicated_experts[t]) == 5 for t in ("user", "item"))


def test_adaptor_from_config_defaults_match_the_method():
    adaptor = HybridExpertAdaptor.from_config(ModelConfig(), input_dim=384)
    assert adaptor(torch.randn(2, 384), torch.randn(2, 384)).shape == (2, 64)
    first = adaptor.shared_experts[0].net[0]
    assert (first.in_features, first.out_features) == (384, 128)


def test_shared_experts_are_used_by_both_towers_and_dedicated_ones_are_not():
    adaptor = HybridExpertAdaptor(12, 2, 3, 16, 8, dropout=0.0)
    adaptor.tower("user", torch.randn(4, 12)).sum().backward()
    has_grad = lambda m: any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())  # noqa: E731
    assert all(has_grad(e) for e in adaptor.shared_experts)
    assert all(has_grad(e) for e in adaptor.dedicated_experts["user"])
    assert not any(has_grad(e) for e in adaptor.dedicated_experts["item"])
    adaptor.zero_grad(set_to_none=True)
    adaptor.tower("item", torch.randn(4, 12)).sum().backward()
    assert all(has_grad(e) for e in adaptor.shared_experts)
    assert not any(has_grad(e) for e in adaptor.dedicated_experts["user"])
    # The same expert object serves both towers: changing it changes both outputs.
    x = torch.randn(3, 12)
    before = (adaptor.tower("user", x).detach(), adaptor.tower("item", x).detach())
    with torch.no_grad():
        adaptor.shared_experts[0].net[0].bias.add_(5.0)
    assert not torch.allclose(before[0], adaptor.tower("user", x))
    assert not torch.allclose(before[1], adaptor.tower("item", x))


def test_adaptor_rejects_a_knowledge_dimension_it_was_not_built_for():
    adaptor = HybridExpertAdaptor(384, 2, 5, 16, 8)
    with pytest.raises(ValueError, match=r"\(2, 768\) but the adaptor expects \(batch, 384\).*encoder"):
        adaptor(torch.randn(2, 768), torch.randn(2, 768))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("with_knowledge", [False, True])
def test_each_backbone_trains_and_its_loss_falls(name, with_knowledge):
    seed_everything(0)
    train = tiny_batch(512, seed=1)
    adaptor = HybridExpertAdaptor.from_config(TINY, 12) if with_knowledge else None
    model = CTRModel(build_backbone(name, VOCABS, TINY, 2 * TINY.expert_output_dim if with_knowledge else 0), adaptor)
    trainer = Trainer(model, learning_rate=2e-2, batch_size=64, max_epochs=1, seed=0, device="cpu", progress=False)
    losses = [trainer.train_epoch([train]) for _ in range(10)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert trainer.evaluate([train])["auc"] > 0.8


def test_backbone_refuses_augmented_vectors_of_the_wrong_size():
    backbone = build_backbone("dcnv2", VOCABS, TINY, augmented_dim=16)
    batch = tiny_batch(4)
    with pytest.raises(ValueError, match="augmented vectors of 16 dims"):
        backbone(batch, torch.randn(4, 10))
    with pytest.raises(ValueError, match="without knowledge"):
        build_backbone("din", VOCABS, TINY, 0)(batch, torch.randn(4, 16))


def test_early_stopping_keeps_the_best_validation_weights(tmp_path):
    seed_everything(0)
    train, valid = tiny_batch(256, seed=1), tiny_batch(256, seed=2)
    valid["label"] = 1 - valid["label"]  # validation disagrees with training: it gets worse as training goes on
    model = CTRModel(build_backbone("deepfm", VOCABS, TINY, 0))
    ckpt = tmp_path / "ckpt" / "best.pt"
    trainer = Trainer(model, learning_rate=1e-2, batch_size=64, max_epochs=30, patience=2, seed=0,
                      checkpoint_path=ckpt, device="cpu", progress=False)
    fit = trainer.fit([train], [valid])
    assert fit["epochs_run"] == fit["best_epoch"] + 2 < 30
    assert trainer.evaluate([valid])["auc"] == pytest.approx(fit["best_valid_auc"])
    saved = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    assert not list(ckpt.parent.glob("*.tmp"))


def test_metrics_match_their_definitions():
    from sklearn.metrics import log_loss, roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(rng.random(500) * 0.5 + y * 0.3, 0, 1).round(2)  # ties included
    assert metrics.auc(y, p) == pytest.approx(roc_auc_score(y, p))
    assert metrics.logloss(y, p) == pytest.approx(log_loss(y, np.clip(p, 1e-7, 1 - 1e-7)))
    assert np.isnan(metrics.auc(np.ones(5), np.arange(5)))


def test_evaluation_gate_maths():
    ok = evaluation_gate(0.70, 0.703, 0.704, 0.005, 0.005)
    assert ok["passed"] and [c["check"] for c in ok["checks"]] == ["vs_no_knowledge", "vs_published"]
    worse_than_baseline = evaluation_gate(0.69, 0.70, None, 0.005, 0.005)
    assert not worse_than_baseline["passed"] and len(worse_than_baseline["checks"]) == 1
    worse_than_published = evaluation_gate(0.72, 0.70, 0.73, 0.005, 0.005)
    assert not worse_than_published["passed"]
    assert [c["passed"] for c in worse_than_published["checks"]] == [True, False]
    assert not evaluation_gate(float("nan"), 0.7, None, 0.005, 0.005)["passed"]


def test_minibatches_are_shuffled_within_a_bounded_window_the_same_way_for_a_seed():
    chunks = [{"x": torch.arange(s, s + 10), "label": torch.zeros(10)} for s in range(0, 100, 10)]

    def draw(seed):
        return [b["x"] for b in shuffled_minibatches(chunks, 8, 30, torch.Generator().manual_seed(seed))]

    drawn = draw(0)
    assert max(len(b) for b in drawn) == 8
    assert torch.equal(torch.cat(drawn).sort().values, torch.arange(100))  # every row once an epoch
    assert [b.tolist() for b in drawn] == [b.tolist() for b in draw(0)] != [b.tolist() for b in draw(1)]
    # The first window holds the first 30 rows: its 3 full minibatches come from them, shuffled.
    first = torch.cat(drawn[:3])
    assert first.max() < 30 and not torch.equal(first, first.sort().values)
