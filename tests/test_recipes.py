"""plan_shared/recipes.py: the two downstream recipes behind one interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from plan_shared.config import PlanConfig, config_from_dict
from plan_shared.recipes import PhiDownRecipe, PlainRecipe, make_recipe, resnet18_small


def _task(n: int = 48, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Two classes told apart by a bright centre square, images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 2).numpy()
    x = torch.rand(n, 1, size, size, generator=g) * 0.6 - 1.0
    x[torch.as_tensor(y) == 1, :, 2:6, 2:6] += 1.2
    return x, y


def _cfg(**plain) -> PlanConfig:
    return config_from_dict({"downstream": {"width": 8, "depth": 2, "feature_dim": 16, "epochs": 4, "batch_size": 16,
                                            "plain": {"epochs": 3, "batch_size": 16, "lr": 0.05, **plain}}})


def test_make_recipe_names_both_and_refuses_others():
    sec = _cfg().downstream
    assert isinstance(make_recipe("phi_down", sec), PhiDownRecipe)
    assert isinstance(make_recipe("plain", sec), PlainRecipe)
    with pytest.raises(ValueError, match=r"downstream.recipes: unknown recipe 'vit' \(known: phi_down, plain\)"):
        make_recipe("vit", sec)
    with pytest.raises(ValueError, match="recipes"):
        config_from_dict({"downstream": {"recipes": ["plain", "vit"]}})


def test_resnet18_is_adapted_to_small_images():
    m = resnet18_small(3, 1, 28)
    assert isinstance(m.conv1, nn.Conv2d) and m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert isinstance(m.maxpool, nn.Identity) and m.fc.out_features == 3
    assert resnet18_small(2, 3, 32, stem_stride=2).conv1.stride == (2, 2)
    with torch.no_grad():
        assert m.eval()(torch.zeros(1, 1, 28, 28)).shape == (1, 3)


@pytest.mark.parametrize("name", ["phi_down", "plain"])
def test_each_recipe_learns_a_separable_task(name):
    torch.set_num_threads(1)
    x, y = _task()
    recipe = make_recipe(name, _cfg(stem_stride=2).downstream)
    model, info = recipe.train(x, y, 2, seed=0)
    xt, yt = _task(seed=1)
    probs = recipe.predict(model, xt)
    assert probs.shape == (len(yt), 2) and torch.allclose(probs.sum(1), torch.ones(len(yt)), atol=1e-5)
    acc = float((probs.argmax(1).numpy() == yt).mean())
    assert acc >= 0.8, (name, acc, info)
    assert not model.training


def test_plain_recipe_is_plain_fixed_epochs_no_selection_and_recalibrated_bn():
    x, y = _task(n=32)
    recipe = make_recipe("plain", _cfg(stem_stride=2, epochs=2).downstream)
    model, info = recipe.train(x, y, 2, seed=0)
    assert info["epochs"] == 2 and len(info["train_loss"]) == 2 and info["n_train"] == 32  # every image trains
    # BatchNorm running statistics are the exact mean over the training images (stem BN on stem conv outputs)
    with torch.no_grad():
        feats = model.conv1(x)
    torch.testing.assert_close(model.bn1.running_mean, feats.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)


def test_phi_down_recipe_selects_its_epoch_on_a_held_out_part_unless_it_continues_fedavg():
    x, y = _task()
    recipe = make_recipe("phi_down", _cfg().downstream)
    model, info = recipe.train(x, y, 2, seed=0)
    assert info["n_val"] > 0 and info["n_train"] + info["n_val"] == len(y) and info["best_epoch"] is not None
    # a FedAvg local step: from the given weights, all its images, the given number of epochs
    cont, info2 = recipe.train(x, y, 2, seed=1, init_state=model.state_dict(), epochs=1)
    assert info2["n_val"] == 0 and info2["n_train"] == len(y)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), cont.state_dict().values()))


def test_plain_recipe_continues_from_given_weights():
    x, y = _task(n=16)
    recipe = make_recipe("plain", _cfg(stem_stride=2).downstream)
    start = recipe.build(2, 1, 8)
    with torch.no_grad():
        start.fc.bias.fill_(3.0)
    model, info = recipe.train(x, y, 2, seed=0, init_state=start.state_dict(), epochs=1)
    assert info["epochs"] == 1 and float(model.fc.bias.detach().mean()) > 1.0  # one small epoch does not undo the start


@pytest.mark.parametrize("name", ["phi_down", "plain"])
def test_bad_training_sets_name_the_recipe(name):
    recipe = make_recipe(name, _cfg().downstream)
    x, y = _task(n=8)
    with pytest.raises(ValueError, match=rf"recipe {name}: labels must lie in 0..1, got 0..2"):
        recipe.train(x, np.r_[y[:-1], 2], 2, seed=0)
    with pytest.raises(ValueError, match=rf"recipe {name}: need images \[N, C, H, W\] and N labels"):
        recipe.train(x, y[:5], 2, seed=0)
