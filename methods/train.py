"""The one training loop, evaluation and batch-norm recalibration used by every method.

A method supplies ``loss_fn(images, labels, step) -> loss`` (a scalar); the loop owns the
optimiser, the learning-rate schedule, the device, progress lines and the step budget. Methods
that sample sub-networks (stitching, progressive shrinking) do their sampling inside ``loss_fn``.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from podium.methods import checkpoint, distributed
from podium.methods.base import StrictModel
from podium.methods.checkpoint import TrainingEnv, capture_rng, current_env, restore_rng

log = logging.getLogger("podium.train")

LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


class TrainConfig(StrictModel):
    epochs: float = 5.0  # may be fractional; ``max_steps`` caps it further
    max_steps: int | None = None
    lr: float = 0.05
    optimizer: Literal["sgd", "adamw"] = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    seed: int = 0
    log_every_s: float = 10.0  # a progress line at most this often


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    images_per_s: float
    wall_s: float
    resumed_at: int = 0  # the step a checkpoint let this run start from


def pick_device(preference: str | None = None) -> torch.device:
    """None or ``auto`` defer to the :func:`training_env` (whose ``auto`` is CUDA when present, else CPU)."""
    if preference in (None, "auto"):
        preference = current_env().device
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def parameter_groups(params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm parameters (1-D tensors), as in pycls/OFA/timm."""
    decay, no_decay = [], []
    for _name, p in params:
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    groups = parameter_groups(model.named_parameters(), cfg.weight_decay)
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier on the base learning rate: linear warm-up then cosine decay to 0."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    model: nn.Module,
    loader: DataLoader,
    loss_fn: LossFn,
    cfg: TrainConfig,
    *,
    name: str = "model",
    optimizer: torch.optim.Optimizer | None = None,
    rngs: Sequence[random.Random] = (),
) -> TrainResult:
    """Train ``model`` (already on its device) for ``cfg`` epochs/steps minimising ``loss_fn``.

    ``model`` is what the optimiser updates (pass a container holding every trained part).
    ``rngs`` are the method's own random generators (sub-network samplers): checkpointed with the
    rest, so a resumed run draws what the uninterrupted one would. Inside a :func:`training_env`
    with checkpoints, ``name`` is the checkpoint's name: unique within one training.
    """
    env = current_env()
    device = model_device(model)
    optimizer = optimizer or make_optimizer(model, cfg)
    base_lrs = [group["lr"] for group in optimizer.param_groups]  # before a resume overwrites them
    steps = total_steps(cfg, len(loader))
    shuffle = loader.generator  # None: the sampler draws from torch's global generator
    torch.manual_seed(cfg.seed)
    saved = _load_checkpoint(env, name, model, optimizer, steps)
    step, batch, loss_value = (saved["step"], saved["batch"], saved["loss"]) if saved else (0, 0, float("nan"))
    epoch_rng = saved["epoch_rng"] if saved else None
    if saved and step >= steps:
        restore_rng(saved["rng"], shuffle, rngs)
    model.train()
    start_step, seen = step, 0
    start = last_log = last_save = time.perf_counter()
    with distributed.synchronized_batchnorm(model):  # no-op in one process
        while step < steps:
            if epoch_rng is None:
                epoch_rng = capture_rng(shuffle, rngs)  # before the loader draws this epoch's order
            else:
                restore_rng(epoch_rng, shuffle, rngs)  # resuming: draw the interrupted epoch's order again
            batches = iter(loader)
            for _ in range(batch):  # the batches the interrupted run already trained on
                next(batches)
            if saved:
                restore_rng(saved["rng"], shuffle, rngs)
                saved = None
            for images, labels in batches:
                seen += images.shape[0]
                images, labels, share = distributed.shard(images, labels)  # the whole batch in one process
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                scale = cosine_lr(step, steps, cfg.warmup_steps)
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = base * scale
                loss = loss_fn(images, labels, step)
                optimizer.zero_grad(set_to_none=True)
                (loss * share if share != 1.0 else loss).backward()
                distributed.sum_gradients(model)  # no-op in one process
                optimizer.step()
                step, batch = step + 1, batch + 1
                now = time.perf_counter()
                if distributed.is_primary() and (now - last_log >= cfg.log_every_s or step == steps):
                    loss_value = loss.item()  # sync only when reporting, not every step
                    rate = seen / max(now - start, 1e-9)
                    eta = (steps - step) * (now - start) / (step - start_step)
                    log.info("%s: epoch %.2f step %d/%d loss %.4f %.0f img/s ETA %.0fs",
                             name, step / len(loader), step, steps, loss_value, rate, eta)
                    last_log = now
                if env.checkpoints is not None and step < steps and now - last_save >= env.every_s:
                    _save_checkpoint(env, name, model, optimizer, steps, step, batch, loss.item(), epoch_rng,
                                     capture_rng(shuffle, rngs))
                    last_save = time.perf_counter()
                if step >= steps:
                    break
            else:
                batch, epoch_rng = 0, None
    if env.checkpoints is not None and step > start_step:  # done: a re-run skips straight to the end
        _save_checkpoint(env, name, model, optimizer, steps, step, batch, loss_value, epoch_rng,
                         capture_rng(shuffle, rngs))
    wall = time.perf_counter() - start
    return TrainResult(steps=step, final_loss=loss_value, images_per_s=seen / max(wall, 1e-9), wall_s=wall,
                       resumed_at=start_step)


def _save_checkpoint(env: TrainingEnv, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int,
                     step: int, batch: int, loss: float, epoch_rng: dict | None, rng: dict) -> None:
    if not distributed.is_primary():  # every process holds the same state: one writes it
        return
    state = {"name": name, "steps": steps, "step": step, "batch": batch, "loss": loss, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "epoch_rng": epoch_rng, "rng": rng}
    env.checkpoints.save(name, checkpoint.dumps(state))
    log.info("%s: checkpoint at step %d/%d", name, step, steps)


def _load_checkpoint(env: TrainingEnv, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                     steps: int) -> dict | None:
    """The saved state, already loaded into ``model`` and ``optimizer``; None to start from step 0."""
    data = env.checkpoints.load(name) if env.checkpoints is not None else None
    if data is None:
        return None
    try:
        state = checkpoint.loads(data)
        if state["name"] != name or state["steps"] != steps:
            raise ValueError(f"it is for {state['name']!r} with {state['steps']} steps, not {steps}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except Exception as exc:  # noqa: BLE001 - an unusable checkpoint costs the progress, not the run
        log.warning("%s: ignoring checkpoint (%s); training from step 0", name, str(exc).splitlines()[0][:200])
        return None
    log.info("%s: resumed from checkpoint at step %d/%d", name, state["step"], steps)
    return state


def cross_entropy_loss(model: nn.Module, label_smoothing: float = 0.0) -> LossFn:
    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        return nn.functional.cross_entropy(model(images), labels, label_smoothing=label_smoothing)

    return loss_fn


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, input_size: tuple[int, int] | None = None) -> float:
    """Top-1 accuracy in [0, 1]. ``input_size`` resizes inputs (for candidates at another resolution)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images = resize(images.to(device), input_size)
        correct += (model(images).argmax(dim=1) == labels.to(device)).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / max(total, 1)


def resize(images: torch.Tensor, input_size: tuple[int, int] | None) -> torch.Tensor:
    if input_size is None or tuple(images.shape[-2:]) == tuple(input_size):
        return images
    return nn.functional.interpolate(images, size=input_size, mode="bilinear", align_corners=False)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: DataLoader, num_batches: int = 20,
                   input_size: tuple[int, int] | None = None) -> None:
    """Reset BN running stats and set them to the average batch statistics on training images.

    Needed whenever a network's path differs from the one its stats were collected on
    (OFA sub-networks, stitches). Uses a cumulative average (momentum=None).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    saved = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    device = model_device(model)
    was_training = model.training
    model.train()
    for i, (images, _labels) in enumerate(loader):
        if i >= num_batches:
            break
        model(resize(images.to(device), input_size))
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
