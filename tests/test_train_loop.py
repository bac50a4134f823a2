"""The training loop's hardware features: mixed precision, channels-last, gradient accumulation, the
weight EMA (and its resume), and timm's optimizers. CUDA-only paths run where a GPU is present."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from podium.methods.checkpoint import DirectoryCheckpoints, TrainingEnv, training_env
from podium.methods.train import TrainConfig, cross_entropy_loss, fit, make_optimizer
from tests.conftest import digits_bundle

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Crash(RuntimeError):
    pass


def conv_net(norm: bool = True) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.BatchNorm2d(8) if norm else nn.Identity(), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def fixed_batches(batch_size: int, n: int = 64) -> DataLoader:
    """The same ``n`` images in the same order, whatever the batch size."""
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 1, 12, 12, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=False)


def noisy_loss(model: nn.Module, rng: random.Random, crash_at: int | None = None, steps: list | None = None):
    def loss_fn(images: torch.Tensor, labels: torch.Tensor, step: int) -> torch.Tensor:
        if step == crash_at:
            raise Crash(f"killed at step {step}")
        if steps is not None:
            steps.append(step)
        images = images + rng.random() * 0.1 * torch.randn_like(images)
        return nn.functional.cross_entropy(model(images), labels)
    return loss_fn


def test_bf16_on_cpu_trains_under_autocast_with_fp32_weights() -> None:
    model, dtypes = conv_net(), []

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        logits = model(images)
        dtypes.append(logits.dtype)
        return nn.functional.cross_entropy(logits, labels)

    result = fit(model, fixed_batches(16), loss_fn, TrainConfig(max_steps=4, lr=0.05, precision="bf16"))
    assert result.steps == 4 and torch.isfinite(torch.tensor(result.final_loss))
    assert set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def two_conv_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_cpu_defaults_are_fp32_and_a_single_convolution_stays_contiguous() -> None:
    """A lone convolution (a ViT's patch embedding) is no convolutional network: no channels-last."""
    model, dtypes = conv_net(), []

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        dtypes.append(model(images).dtype)
        assert images.is_contiguous()
        return nn.functional.cross_entropy(model(images), labels)

    fit(model, fixed_batches(16), loss_fn, TrainConfig(max_steps=2))
    assert set(dtypes) == {torch.float32}
    assert model[0].weight.is_contiguous()


def test_fp16_on_cpu_is_refused() -> None:
    model = conv_net()
    with pytest.raises(ValueError, match="precision fp16 needs a CUDA device"):
        fit(model, fixed_batches(16), cross_entropy_loss(model), TrainConfig(max_steps=1, precision="fp16"))


def test_channels_last_converts_the_model_and_the_batches() -> None:
    model, seen = conv_net(), []

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        seen.append(images.is_contiguous(memory_format=torch.channels_last))
        return nn.functional.cross_entropy(model(images), labels)

    fit(model, fixed_batches(16), loss_fn, TrainConfig(max_steps=2, channels_last=True))
    assert seen == [True, True]
    assert model[0].weight.is_contiguous()  # back in the format export and safetensors expect


def test_auto_trains_convolutional_networks_channels_last_on_cpu() -> None:
    """Measured faster on CPU for every convolutional family (bench/training_steps.py): 1.10-1.86x."""
    model, seen = two_conv_net(), []

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        seen.append((images.is_contiguous(memory_format=torch.channels_last),
                     model[2].weight.is_contiguous(memory_format=torch.channels_last)))
        return nn.functional.cross_entropy(model(images), labels)

    fit(model, fixed_batches(16), loss_fn, TrainConfig(max_steps=2))
    assert seen == [(True, True)] * 2
    assert all(p.is_contiguous() for p in model.parameters())


def test_accumulated_batches_make_the_step_of_one_big_batch() -> None:
    trained = []
    for batch_size, accumulate in ((32, 1), (16, 2)):
        model = conv_net(norm=False)  # batch norm would see other batch statistics
        result = fit(model, fixed_batches(batch_size), cross_entropy_loss(model),
                     TrainConfig(max_steps=1, lr=0.5, weight_decay=0.0, accumulate=accumulate))
        assert result.steps == 1
        trained.append(model.state_dict())
    untrained = conv_net(norm=False).state_dict()
    for key, big in trained[0].items():
        assert not torch.equal(big, untrained[key])
        torch.testing.assert_close(trained[1][key], big, rtol=0, atol=1e-6)


def test_accumulation_counts_optimizer_steps_and_flushes_at_the_epoch_end() -> None:
    model, steps = conv_net(), []
    result = fit(model, fixed_batches(16, n=80), noisy_loss(model, random.Random(0), steps=steps),
                 TrainConfig(epochs=2, accumulate=2))  # 5 batches an epoch: steps of 2, 2 and 1 batches
    assert result.steps == 6
    assert steps == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]


def train(store: Path | None, cfg: TrainConfig, crash_at: int | None = None) -> nn.Module:
    """A fresh process's run: fresh model, method RNG and loader (same seeds)."""
    data = digits_bundle(image_size=(16, 16), batch_size=64)
    model, rng = conv_net(), random.Random(7)
    env = TrainingEnv(checkpoints=DirectoryCheckpoints(store) if store else None, every_s=0.0)
    with training_env(env):
        fit(model, data.train, noisy_loss(model, rng, crash_at), cfg, name="net", rngs=[rng])
    return model


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


EMA = TrainConfig(epochs=2, lr=0.05, seed=3, ema_decay=0.9, accumulate=2)


def test_ema_weights_end_in_the_model() -> None:
    plain, averaged = train(None, EMA.model_copy(update={"ema_decay": None})), train(None, EMA)
    assert not torch.equal(plain[0].weight, averaged[0].weight)
    untrained = conv_net()
    assert not torch.equal(untrained[0].weight, averaged[0].weight)


def test_resumed_fit_with_ema_and_accumulation_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    reference = train(None, EMA)
    with pytest.raises(Crash):
        train(tmp_path, EMA, crash_at=4)
    assert_same_weights(train(tmp_path, EMA), reference)
    assert_same_weights(train(tmp_path, EMA), reference)  # the finished checkpoint: straight to the end


def test_checkpoint_of_another_accumulation_is_not_resumed(tmp_path: Path) -> None:
    with pytest.raises(Crash):
        train(tmp_path, EMA, crash_at=2)
    other = EMA.model_copy(update={"accumulate": 1, "max_steps": 20})  # as many steps, of other batches
    assert_same_weights(train(tmp_path, other), train(None, other))


@pytest.mark.parametrize("name", ["lamb", "rmsproptf", "adamw"])
def test_timm_optimizers_train(name: str) -> None:
    model = conv_net()
    cfg = TrainConfig(max_steps=3, lr=1e-3, optimizer=name)
    assert type(make_optimizer(model, cfg)).__name__.lower().startswith(name[:4])
    result = fit(model, fixed_batches(16), cross_entropy_loss(model), cfg)
    assert result.steps == 3 and torch.isfinite(torch.tensor(result.final_loss))


def test_sgd_is_nesterov_without_decay_on_1d_parameters() -> None:
    optimizer = make_optimizer(conv_net(), TrainConfig(weight_decay=1e-3, momentum=0.8))
    assert isinstance(optimizer, torch.optim.SGD)
    for group in optimizer.param_groups:
        assert group["nesterov"] and group["momentum"] == 0.8
        assert group["weight_decay"] == (1e-3 if all(p.ndim > 1 for p in group["params"]) else 0.0)


def test_unknown_optimizer_is_a_one_line_error_naming_it() -> None:
    with pytest.raises(ValidationError) as info:
        TrainConfig(optimizer="sgdd")
    message = info.value.errors()[0]["msg"]
    assert "unknown optimizer 'sgdd'" in message and "\n" not in message


# ------------------------------------------------------------------------------------------- CUDA only


@needs_cuda
def test_cuda_auto_uses_mixed_precision_and_channels_last() -> None:
    model, seen = two_conv_net().cuda(), []
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        logits = model(images)
        seen.append((logits.dtype, images.is_contiguous(memory_format=torch.channels_last)))
        return nn.functional.cross_entropy(logits, labels)

    result = fit(model, fixed_batches(16), loss_fn, TrainConfig(max_steps=3))
    assert seen == [(expected, True)] * 3 and torch.isfinite(torch.tensor(result.final_loss))
    assert all(p.dtype == torch.float32 for p in model.parameters())


@needs_cuda
def test_cuda_fp16_resume_restores_the_grad_scaler(tmp_path: Path) -> None:
    def mlp_run(store: Path | None, crash_at: int | None = None) -> nn.Module:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Flatten(), nn.Linear(144, 64), nn.ReLU(), nn.Linear(64, 10)).cuda()
        rng = random.Random(7)
        env = TrainingEnv(checkpoints=DirectoryCheckpoints(store) if store else None, every_s=0.0)
        with training_env(env):
            fit(model, fixed_batches(8), noisy_loss(model, rng, crash_at),
                TrainConfig(epochs=2, precision="fp16", ema_decay=0.9), name="mlp", rngs=[rng])
        return model

    reference = mlp_run(None)
    with pytest.raises(Crash):
        mlp_run(tmp_path, crash_at=11)
    assert_same_weights(mlp_run(tmp_path), reference)
