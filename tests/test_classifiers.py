"""Generic classifier training: learns a separable toy task; augmentation keeps shapes."""

import torch

from plan_shared.classifiers import TrainSpec, accuracy_of, augment_batch, build_classifier, embed, train_classifier
from plan_shared.config import IdentityConfig


def test_augment_shapes_and_range():
    x = torch.rand(5, 1, 16, 16) * 2 - 1
    y = augment_batch(x, TrainSpec(shift=0.125, noise=0.1, blur=1.0, contrast=0.2), torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.abs().max() <= 1.5


def test_train_identity_cosine_head():
    torch.manual_seed(0)
    x = torch.rand(12, 1, 8, 8) * 2 - 1
    ids = torch.arange(12)
    model = build_classifier(12, 1, 8, IdentityConfig(width=4, depth=2, feature_dim=16), head="cosine")
    hist = train_classifier(model, x, ids, TrainSpec(epochs=40, batch_size=12, lr=1e-2, shift=0.0), val=(x, ids), progress=False)
    assert accuracy_of(model, x, ids) >= 0.9
    assert hist["best_epoch"] is not None
    e = embed(model, x)
    assert torch.allclose(e.norm(dim=1), torch.ones(12), atol=1e-5)
