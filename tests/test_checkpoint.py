"""Resumable training: a fit interrupted mid-run and started again ends with exactly the weights of
an uninterrupted fit, whatever random state the method's loss draws from."""
from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from podium.methods.data import DataBundle
from podium.methods.checkpoint import DirectoryCheckpoints, TrainingEnv, training_env
from podium.methods.train import TrainConfig, fit, pick_device
from tests.conftest import digits_bundle


class Crash(RuntimeError):
    pass


def small_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def noisy_loss(model: nn.Module, rng: random.Random, crash_at: int | None = None):
    """Draws from the global torch RNG (dropout, noise) and from a method-owned ``random.Random``."""
    def loss_fn(images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        if step == crash_at:
            raise Crash(f"killed at step {step}")
        images = images + rng.random() * 0.1 * torch.randn_like(images)
        return nn.functional.cross_entropy(model(images), labels)
    return loss_fn


@pytest.fixture
def data() -> DataBundle:
    return digits_bundle(image_size=(16, 16), batch_size=128)


CFG = TrainConfig(epochs=3, lr=0.05, optimizer="sgd", seed=3)


def train(data: DataBundle, store: Path | None, crash_at: int | None = None) -> tuple[nn.Module, object]:
    """Each call is a fresh process's run: fresh model, method RNG and data loaders (same seeds)."""
    data = digits_bundle(image_size=(16, 16), batch_size=128)
    model, rng = small_net(), random.Random(7)
    env = TrainingEnv(checkpoints=DirectoryCheckpoints(store) if store else None, every_s=0.0)
    with training_env(env):
        result = fit(model, data.train, noisy_loss(model, rng, crash_at), CFG, name="net", rngs=[rng])
    return model, result


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("where", ["mid-epoch", "epoch-start"])
def test_resumed_fit_ends_with_the_uninterrupted_weights(data: DataBundle, tmp_path: Path, where: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    per_epoch = len(data.train)
    crash_at = per_epoch // 2 if where == "mid-epoch" else per_epoch
    reference, _ = train(data, None)
    with pytest.raises(Crash):
        train(data, tmp_path, crash_at=crash_at)
    with caplog.at_level(logging.INFO, logger="podium.train"):
        resumed, result = train(data, tmp_path)
    assert result.resumed_at == crash_at
    assert f"net: resumed from checkpoint at step {crash_at}/{3 * per_epoch}" in caplog.text
    assert_same_weights(resumed, reference)


def test_finished_fit_is_not_trained_again(data: DataBundle, tmp_path: Path) -> None:
    first, _ = train(data, tmp_path)
    again, result = train(data, tmp_path)
    assert result.resumed_at == result.steps == 3 * len(data.train)
    assert_same_weights(again, first)


def test_unusable_checkpoint_is_ignored_with_a_warning(data: DataBundle, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "net.pt").write_bytes(b"not a checkpoint")
    with caplog.at_level(logging.WARNING, logger="podium.train"):
        _, result = train(data, tmp_path)
    assert result.resumed_at == 0 and result.steps == 3 * len(data.train)
    assert "net: ignoring checkpoint" in caplog.text


def test_checkpoint_of_another_schedule_is_not_resumed(data: DataBundle, tmp_path: Path) -> None:
    train(data, tmp_path)
    model = small_net()
    with training_env(TrainingEnv(checkpoints=DirectoryCheckpoints(tmp_path), every_s=0.0)):
        result = fit(model, data.train, noisy_loss(model, random.Random(7)), CFG.model_copy(update={"epochs": 2}),
                     name="net")
    assert result.resumed_at == 0 and result.steps == 2 * len(data.train)


def test_training_env_chooses_the_device() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with training_env(TrainingEnv(device="cpu")):
        assert pick_device() == torch.device("cpu")
        assert pick_device("auto") == torch.device("cpu")  # a method's "auto" follows the run's choice
    assert pick_device("cpu") == torch.device("cpu")
