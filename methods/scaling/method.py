"""The scaling method: train every member of the planned scaled family; each is a candidate."""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from podium.methods.base import Anchor, AnchorSpec, Candidate, CandidateSpace, DataShape, LoadWeights, Method
from podium.methods.catalog import register_method
from podium.methods.complexity import Complexity, count
from podium.methods.data import DataBundle
from podium.methods.families import build
from podium.methods.losses import kd_kl
from podium.methods.scaling.config import ScalingConfig
from podium.methods.scaling.plan import ScaledModel, describe_scales, plan_scales
from podium.methods.train import evaluate, fit, pick_device, resize, seeded

log = logging.getLogger("podium.scaling")

METHOD_NAME = "scaling"


@dataclass
class _Trained:
    plan: ScaledModel
    model: nn.Module
    val_acc: float
    complexity: Complexity


@dataclass
class ScalingSpace(CandidateSpace):
    """The trained scaled family; every member is a candidate on every device."""

    family: str
    in_chans: int
    members: list[_Trained] = field(default_factory=list)
    num_classes: int = 0  # what rebuilds the members (0: unknown, the space cannot be saved)

    def candidates(self, device: Any = None) -> Iterator[Candidate]:
        for m in self.members:
            cx = m.complexity
            yield Candidate(
                name=f"scaling-{m.plan.name}",
                method=METHOD_NAME,
                config={"strategy": m.plan.strategy, "s": m.plan.s, "arch": copy.deepcopy(m.plan.arch),
                        "resolution": m.plan.resolution},
                model=m.model,
                input_size=(m.plan.resolution, m.plan.resolution),
                metrics={"val_acc": m.val_acc, "flops": float(cx.flops), "params": float(cx.params),
                         "acts": float(cx.acts), "flops_factor": m.plan.flops_factor, "s_rule": m.plan.s_rule},
                in_chans=self.in_chans,
            )

    def to_record(self) -> tuple[dict[str, Any], dict[str, nn.Module]]:
        if not self.num_classes:
            raise ValueError("this scaling space does not know its number of classes: it cannot be saved")
        members = [{"plan": asdict(m.plan), "val_acc": m.val_acc, "complexity": m.complexity.as_dict()}
                   for m in self.members]
        record = {"family": self.family, "in_chans": self.in_chans, "num_classes": self.num_classes, "members": members}
        return record, {f"member{i}": m.model for i, m in enumerate(self.members)}

    @classmethod
    def from_record(cls, record: dict[str, Any], weights: LoadWeights, data: DataBundle) -> ScalingSpace:
        """Each member built from its planned architecture by the family's builder."""
        members = []
        for i, row in enumerate(record["members"]):
            plan = ScaledModel(**{**row["plan"], "complexity": Complexity(**row["plan"]["complexity"])})
            model = weights(f"member{i}", build(plan.arch, num_classes=record["num_classes"], in_chans=record["in_chans"]))
            members.append(_Trained(plan=plan, model=model.eval(), val_acc=row["val_acc"],
                                    complexity=Complexity(**row["complexity"])))
        return cls(family=record["family"], in_chans=record["in_chans"], members=members,
                   num_classes=record["num_classes"])

    def candidate_module(self, name: str, config: dict[str, Any]) -> nn.Module:
        return build(config["arch"], num_classes=self.num_classes, in_chans=self.in_chans).eval()


def describe(cfg: ScalingConfig, shape: DataShape, anchors: Sequence[AnchorSpec]) -> list[dict[str, Any]]:
    return describe_scales(cfg, shape.num_classes, shape.channels)


@register_method('scaling', ScalingConfig, describe)
class Scaling(Method):
    """Train every member of a scaled family (base × scales × strategy) and offer each as a candidate."""

    name = METHOD_NAME
    space_type = ScalingSpace

    def __init__(self, cfg: ScalingConfig):
        self.cfg = cfg.variant(cfg.family)  # recipe paper: the EfficientNet schedule differs from RegNet's

    def _loss_fn(self, model: nn.Module, teacher: nn.Module | None):
        cfg = self.cfg

        def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
            logits = model(images)  # read at the member's resolution by the loader
            loss = F.cross_entropy(logits, labels)
            if teacher is None:
                return loss
            with torch.no_grad():
                teacher_logits = teacher(images)  # a _Resized teacher: at its own resolution
            return (1 - cfg.kd_weight) * loss + cfg.kd_weight * kd_kl(logits, teacher_logits, cfg.kd_temperature)

        return loss_fn

    def _train_one(self, plan: ScaledModel, data: DataBundle, teacher: nn.Module | None,
                   device: torch.device) -> _Trained:
        with seeded(self.cfg.train.seed):
            model = build(plan.arch, num_classes=data.num_classes, in_chans=data.input_spec.channels).to(device)
        size = (plan.resolution, plan.resolution)
        loader = data.train_loader(size)
        train = self.cfg.train_config(steps_per_epoch=math.ceil(len(loader) / self.cfg.train.accumulate))
        fit(model, loader, self._loss_fn(model, teacher), train, name=plan.name)
        model = model.cpu().eval()
        val_acc = evaluate(model, data.eval_loader("val", size))
        cx = count(model, size, data.input_spec.channels)
        log.info("%s: res %d depths %s widths %s flops %.2fM (x%.2f) params %.3fM acts %.3fM val_acc %.4f",
                 plan.name, plan.resolution, plan.arch["depths"], plan.arch["widths"], cx.flops / 1e6,
                 plan.flops_factor, cx.params / 1e6, cx.acts / 1e6, val_acc)
        return _Trained(plan=plan, model=model, val_acc=val_acc, complexity=cx)

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> ScalingSpace:
        """Plan the family, then train each member; ``anchors`` are not used (scaling starts from scratch)."""
        cfg = self.cfg
        in_chans = data.input_spec.channels
        plans = plan_scales(cfg, num_classes=data.num_classes, in_chans=in_chans)
        device = pick_device()
        teacher_model: nn.Module | None = None
        order = list(range(len(plans)))
        trained: dict[int, _Trained] = {}
        if cfg.distill:
            if teacher is not None:
                teacher_model = _Resized(teacher.model.to(device).eval(), data.input_spec.size)
            else:
                # No teacher given: train the largest member first and distil the others from it.
                largest = max(order, key=lambda i: plans[i].complexity.flops)
                trained[largest] = self._train_one(plans[largest], data, None, device)
                big_size = (plans[largest].resolution,) * 2
                teacher_model = _Resized(copy.deepcopy(trained[largest].model).to(device).eval(), big_size)
        for i in order:
            if i not in trained:
                trained[i] = self._train_one(plans[i], data, teacher_model, device)
        return ScalingSpace(family=cfg.family, in_chans=in_chans, members=[trained[i] for i in order],
                            num_classes=data.num_classes)


class _Resized(nn.Module):
    """Runs a model at its own resolution whatever the input size (a scaled teacher)."""

    def __init__(self, model: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(resize(x, self.size))
