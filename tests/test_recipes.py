"""Named recipes (``recipe: paper | demo``), field-by-field overrides, lr scaling and the cost meter."""
from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from podium.methods.recipes import RecipeConfig
from podium.methods.train import TrainConfig, fit, measure_cost, scaled_lr


class _Config(RecipeConfig):
    RECIPES: ClassVar = {"paper": {"window": 4, "train": {"lr": 5e-5, "optimizer": "adamw", "lr_batch": 1024}},
                         "paper:cnn": {"train": {"lr": 0.05, "optimizer": "sgd"}}}
    window: int = 2
    train: TrainConfig = TrainConfig(epochs=3, lr=1e-3)


def test_demo_is_the_class_defaults_and_a_nested_override_keeps_the_other_fields():
    assert _Config.model_validate({}) == _Config()
    cfg = _Config.model_validate({"train": {"epochs": 1}})
    assert (cfg.train.epochs, cfg.train.lr) == (1, 1e-3)  # not TrainConfig's own lr default


def test_paper_preset_with_user_overrides_and_variants():
    cfg = _Config.model_validate({"recipe": "paper", "train": {"epochs": 7}})
    assert (cfg.window, cfg.train.optimizer, cfg.train.lr, cfg.train.epochs) == (4, "adamw", 5e-5, 7)
    cnn = cfg.variant("cnn")
    assert (cnn.train.optimizer, cnn.train.lr, cnn.train.epochs, cnn.window) == ("sgd", 0.05, 7, 4)
    mine = _Config.model_validate({"recipe": "paper", "train": {"lr": 1.0}}).variant("cnn")
    assert mine.train.lr == 1.0  # what the user wrote beats every preset
    assert cfg.variant("vit") is cfg  # no such variant


def test_unknown_recipe_is_an_error():
    with pytest.raises(ValidationError, match="demo' or 'paper"):
        _Config.model_validate({"recipe": "papr"})


def test_lr_scales_linearly_with_the_global_batch_and_fit_reports_its_cost():
    assert scaled_lr(TrainConfig(lr=0.1), 64) == 0.1
    assert scaled_lr(TrainConfig(lr=0.05, lr_batch=1024), 256) == pytest.approx(0.0125)
    model = nn.Linear(4, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randint(0, 2, (40,))),
                                         batch_size=8)
    seen_lr = []

    def loss_fn(x, y, _step):
        return nn.functional.cross_entropy(model(x), y)

    cfg = TrainConfig(epochs=1, lr=0.8, lr_batch=32, optimizer="sgd", log_every_s=1e9)
    with measure_cost() as outer:
        with measure_cost() as inner:
            optimizer = torch.optim.SGD(model.parameters(), lr=scaled_lr(cfg, 8))
            fit(model, loader, loss_fn, cfg, optimizer=optimizer)
            seen_lr.append(optimizer.param_groups[0]["initial_lr"])
        fit(model, loader, loss_fn, cfg)
    assert seen_lr == [pytest.approx(0.2)]
    assert (inner.images, inner.steps) == (40, 5)
    assert (outer.images, outer.steps) == (80, 10) and outer.train_s >= inner.train_s > 0
