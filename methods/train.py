"""The one training loop, evaluation and batch-norm recalibration used by every method.

A method supplies ``loss_fn(images, labels, step) -> loss`` (a scalar); the loop owns the
optimiser, the learning-rate schedule, the device, mixed precision, the memory format, gradient
accumulation, the weight EMA, progress lines and the step budget. Methods that sample sub-networks
(stitching, progressive shrinking) do their sampling inside ``loss_fn``.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Literal, Sequence

import timm.optim
import torch
from pydantic import Field, field_validator
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from podium.methods import checkpoint, distributed
from podium.methods.base import StrictModel
from podium.methods.checkpoint import TrainingEnv, capture_rng, current_env, restore_rng

if TYPE_CHECKING:
    from podium.methods.base import CandidateSpace, Method
    from podium.methods.data import Loader

log = logging.getLogger("podium.train")

LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

_SEEDED = threading.Lock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw a model's initial weights from torch's global generator seeded with ``seed``, holding a
    process-wide lock: trainings run side by side in threads, and without it two builds interleave their
    draws from the one global generator, so the same seed gave different weights run to run."""
    with _SEEDED:
        torch.manual_seed(seed)
        yield


class TrainConfig(StrictModel):
    epochs: float = Field(5.0, gt=0, le=100_000)  # may be fractional; ``max_steps`` caps it further
    max_steps: int | None = Field(None, ge=1)  # optimizer steps, as are ``warmup_steps`` and the schedule
    lr: float = Field(0.05, gt=0, le=100)
    # lr_batch: ``lr`` is the learning rate for this many images per optimizer step, scaled linearly to
    # the global batch actually used (Goyal et al.); None: ``lr`` is used as it is
    lr_batch: int | None = Field(None, ge=1)
    optimizer: str = "sgd"  # any of timm.optim.list_optimizers(): sgd (nesterov), adamw, lamb, rmsproptf, ...
    momentum: float = Field(0.9, ge=0, lt=1)  # for the optimizers that take one
    weight_decay: float = Field(5e-4, ge=0, le=1)  # not on biases and norm parameters
    warmup_steps: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    log_every_s: float = Field(10.0, gt=0)  # a progress line at most this often
    # auto: bf16 on CUDA where supported, else fp16 with a grad scaler; fp32 elsewhere. bf16 works on CPU too.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: on for convolutional networks (more than one 2-D convolution: a ViT's patch embedding alone is
    # not one), on CPU too: 1.10-1.86x faster steps for every family measured (bench/training_steps.py)
    channels_last: bool | Literal["auto"] = "auto"
    ema_decay: float | None = Field(None, ge=0.0, lt=1.0)  # a weight EMA (timm ModelEmaV3): the model ends with it
    accumulate: int = Field(1, ge=1)  # batches per optimizer step (the loss of each scaled by 1/accumulate)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name.lower().removeprefix("lookahead_") not in timm.optim.list_optimizers():
            raise ValueError(f"unknown optimizer {name!r}: not one of timm.optim.list_optimizers() (sgd, adamw, "
                             f"lamb, rmsproptf, ...)")
        return name


@dataclass
class TrainingCost:
    """What trainings cost inside :func:`measure_cost`: images through forward and backward (every
    process together), optimizer steps and seconds spent in :func:`fit`."""

    images: int = 0
    steps: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0  # set by fit_method: the whole Method.fit, evaluation and search included
    device_s: float = 0.0  # wall_s times the processes (devices) it ran on

    def as_metrics(self) -> dict[str, float]:
        return {"train_images": float(self.images), "train_wall_s": self.wall_s, "train_device_s": self.device_s}


_COSTS: contextvars.ContextVar[tuple[TrainingCost, ...]] = contextvars.ContextVar("podium_training_costs", default=())


@contextlib.contextmanager
def measure_cost() -> Iterator[TrainingCost]:
    """Sum the cost of every :func:`fit` in this block (meters nest: an outer one counts inner fits too)."""
    meter = TrainingCost()
    token = _COSTS.set((*_COSTS.get(), meter))
    try:
        yield meter
    finally:
        _COSTS.reset(token)


def fit_method(method: "Method", data: Any, anchors: Sequence[Any] = (), teacher: Any = None) -> "CandidateSpace":
    """``method.fit(data, anchors, teacher)`` with what it cost attached as ``space.training_cost``, so that
    methods are compared at equal cost: images trained on, wall seconds and device-seconds."""
    start = time.perf_counter()
    with measure_cost() as cost:
        space = method.fit(data, anchors, teacher)
    cost.wall_s = time.perf_counter() - start
    cost.device_s = cost.wall_s * distributed.world_size()
    space.training_cost = cost
    return space


def _add_cost(images: int, steps: int, seconds: float) -> None:
    for meter in _COSTS.get():
        meter.images += images
        meter.steps += steps
        meter.train_s += seconds


def images_per_step(loader: Any, cfg: TrainConfig) -> int:
    """Images in one optimizer step of ``fit`` over ``loader``, every process together (``cfg.lr_batch`` scales to it)."""
    batch = getattr(loader, "batch_size", None) or loader.batch_sampler.batch_size
    return batch * cfg.accumulate * (distributed.world_size() if getattr(loader, "sharded", False) else 1)


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


def scaled_lr(cfg: TrainConfig, images_per_step: int) -> float:
    """``cfg.lr``, scaled linearly from ``cfg.lr_batch`` images per step to ``images_per_step``."""
    return cfg.lr if cfg.lr_batch is None else cfg.lr * images_per_step / cfg.lr_batch


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """timm's optimizer ``cfg.optimizer`` (``sgd`` is nesterov SGD); no weight decay on 1-D parameters
    (biases, norms) nor on what a timm model's ``no_weight_decay()`` names (position embeddings...)."""
    return timm.optim.create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr if lr is None else lr,
                                          weight_decay=cfg.weight_decay, momentum=cfg.momentum)


def make_scheduler(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> CosineLRScheduler:
    """Per optimizer step: linear warm-up then cosine decay to 0, from each group's current lr.

    timm's warm-up gives ``lr * t / warmup`` at ``t``: :func:`fit` queries ``t = step + 1`` during the
    warm-up, so that step 0 already learns and the last warm-up step is at the full lr.
    """
    for group in optimizer.param_groups:  # the base lr is the lr now, whatever an earlier fit left
        group["initial_lr"] = group["lr"]
    # At least 2: with 1 (or less) only the cosine's t=0 is ever reached, and timm would warn about 1.
    return CosineLRScheduler(optimizer, t_initial=max(2, total - warmup), warmup_t=warmup, warmup_prefix=True,
                             t_in_epochs=False)


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    steps = max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype ``loss_fn`` runs in under autocast; None: plain fp32, no autocast."""
    if precision == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower here and changes the numbers
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, the model is on {device}: use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def uses_channels_last(setting: bool | str, model: nn.Module) -> bool:
    if setting == "auto":
        return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
    return bool(setting)


def fit(
    model: nn.Module,
    loader: "Loader | DataLoader",
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

    A step is an optimizer step over ``cfg.accumulate`` batches (fewer at the end of an epoch);
    ``loss_fn`` sees the step, under autocast when ``cfg.precision`` asks for it. With
    ``cfg.ema_decay`` the EMA weights are copied into ``model`` at the end: callers get the EMA model.
    With channels-last, ``model`` trains in that memory format and ends back in the contiguous one (what
    export, safetensors and inference expect).
    """
    env = current_env()
    device = model_device(model)
    amp_dtype = autocast_dtype(cfg.precision, device)
    autocast = partial(torch.autocast, device.type, amp_dtype) if amp_dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    channels_last = uses_channels_last(cfg.channels_last, model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    sharded = getattr(loader, "sharded", False)
    optimizer = optimizer or make_optimizer(model, cfg, scaled_lr(cfg, images_per_step(loader, cfg)))
    per_epoch = math.ceil(len(loader) / cfg.accumulate)
    steps = total_steps(cfg, per_epoch)
    scheduler = make_scheduler(optimizer, steps, cfg.warmup_steps)  # before a resume overwrites the lrs
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema_decay is not None else None
    stateful = {"model": model, "optimizer": optimizer, "ema": ema.module if ema else None, "scaler": scaler}
    stateful = {key: part for key, part in stateful.items() if part is not None}
    shuffle = loader.generator  # None: the sampler draws from torch's global generator
    torch.manual_seed(cfg.seed)
    saved = _load_checkpoint(env, name, stateful, steps, cfg.accumulate)
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
                if sharded:  # the loader read only this process's share of the global batch
                    share = distributed.share_of_global_batch(images.shape[0])
                else:  # the whole batch in every process: take this process's slice
                    images, labels, share = distributed.shard(images, labels)
                fmt = torch.channels_last if channels_last and images.ndim == 4 else torch.preserve_format
                images = images.to(device, non_blocking=True, memory_format=fmt)
                labels = labels.to(device, non_blocking=True)
                first = batch % cfg.accumulate == 0  # the first batch of this optimizer step
                if first:
                    scheduler.step_update(step + 1 if step < cfg.warmup_steps else step)  # see make_scheduler
                with autocast():
                    loss = loss_fn(images, labels, step)
                if first:
                    optimizer.zero_grad(set_to_none=True)
                weight = share / min(cfg.accumulate, len(loader) - (batch - batch % cfg.accumulate))
                scaled = loss * weight if weight != 1.0 else loss
                (scaler.scale(scaled) if scaler else scaled).backward()
                batch += 1
                if batch % cfg.accumulate and batch < len(loader):
                    continue  # more batches before this optimizer step
                distributed.sum_gradients(model)  # no-op in one process
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                step += 1
                if ema:
                    ema.update(model, step=step)
                now = time.perf_counter()
                if distributed.is_primary() and (now - last_log >= cfg.log_every_s or step == steps):
                    loss_value = loss.item()  # sync only when reporting, not every step
                    rate = seen / max(now - start, 1e-9)
                    eta = (steps - step) * (now - start) / (step - start_step)
                    log.info("%s: epoch %.2f step %d/%d loss %.4f %.0f img/s ETA %.0fs",
                             name, step / per_epoch, step, steps, loss_value, rate, eta)
                    if env.on_progress is not None:
                        env.on_progress(name, step, steps, {"loss": loss_value, "images_per_s": rate,
                                                            "epoch": step / per_epoch})
                    last_log = now
                if env.checkpoints is not None and step < steps and now - last_save >= env.every_s:
                    _save_checkpoint(env, name, stateful, steps, cfg.accumulate, step, batch, loss.item(), epoch_rng,
                                     capture_rng(shuffle, rngs))
                    last_save = time.perf_counter()
                if batch == len(loader) and env.on_epoch is not None and distributed.is_primary():
                    env.on_epoch(name, round(step / per_epoch), model)  # a whole epoch done (the last one too)
                if step >= steps:
                    break
            else:
                batch, epoch_rng = 0, None
    if ema:  # also after a re-run that found the finished checkpoint
        model.load_state_dict(ema.module.state_dict())
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    if env.checkpoints is not None and step > start_step:  # done: a re-run skips straight to the end
        _save_checkpoint(env, name, stateful, steps, cfg.accumulate, step, batch, loss_value, epoch_rng,
                         capture_rng(shuffle, rngs))
    wall = time.perf_counter() - start
    _add_cost(seen * (distributed.world_size() if sharded else 1), step - start_step, wall)
    return TrainResult(steps=step, final_loss=loss_value, images_per_s=seen / max(wall, 1e-9), wall_s=wall,
                       resumed_at=start_step)


def _save_checkpoint(env: TrainingEnv, name: str, stateful: dict[str, Any], steps: int, accumulate: int,
                     step: int, batch: int, loss: float, epoch_rng: dict | None, rng: dict) -> None:
    """``stateful``: the model, the optimizer and, when used, the EMA model and the grad scaler."""
    if not distributed.is_primary():  # every process holds the same state: one writes it
        return
    state = {"name": name, "steps": steps, "accumulate": accumulate, "step": step, "batch": batch, "loss": loss,
             **{key: part.state_dict() for key, part in stateful.items()}, "epoch_rng": epoch_rng, "rng": rng}
    env.checkpoints.save(name, checkpoint.dumps(state))
    log.info("%s: checkpoint at step %d/%d", name, step, steps)


def _load_checkpoint(env: TrainingEnv, name: str, stateful: dict[str, Any], steps: int,
                     accumulate: int) -> dict | None:
    """The saved state, already loaded into ``stateful``'s parts; None to start from step 0."""
    data = env.checkpoints.load(name) if env.checkpoints is not None else None
    if data is None:
        return None
    try:
        state = checkpoint.loads(data)
        saved_for = (state["name"], state["steps"], state.get("accumulate", 1))
        if saved_for != (name, steps, accumulate):
            raise ValueError(f"it is for {saved_for[0]!r} with {saved_for[1]} steps of {saved_for[2]} batches, "
                             f"not {steps} of {accumulate}")
        if missing := [key for key in stateful if key not in state]:  # before loading any part
            raise ValueError(f"it has no {' or '.join(missing)} state")
        for key, part in stateful.items():
            part.load_state_dict(state[key])
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
def evaluate(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Top-1 accuracy in [0, 1] on every batch of ``loader`` (read at the resolution the model runs at)."""
    device = model_device(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        images = images.to(device)
        correct += (model(images).argmax(dim=1) == labels.to(device)).sum().item()
        total += labels.numel()
    model.train(was_training)
    return correct / max(total, 1)


def resize(images: torch.Tensor, input_size: tuple[int, int] | None) -> torch.Tensor:
    """A batch resized on the tensor: only for a teacher that runs at its own resolution; data for
    the trained model is read at its size by the loader (:meth:`methods.data.DataBundle.train_loader`)."""
    if input_size is None or tuple(images.shape[-2:]) == tuple(input_size):
        return images
    return nn.functional.interpolate(images, size=input_size, mode="bilinear", align_corners=False)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Reset BN running stats and set them to the average batch statistics over ``loader`` (a fixed
    subset of training images, e.g. ``data.eval_loader("train", size, limit=n)``).

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
    for images, _labels in loader:
        model(images.to(device))
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
