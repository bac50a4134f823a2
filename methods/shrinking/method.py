"""The method: progressive shrinking (``Shrinking.fit``) and the trained supernet as a candidate
space searched per device (``ShrinkSpace``)."""
from __future__ import annotations

import copy
import logging
import math
import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from podium.methods.base import Anchor, AnchorSpec, Candidate, CandidateSpace, DataShape, LoadWeights, Method
from podium.methods.catalog import register_method
from podium.methods.complexity import count
from podium.methods.data import DataBundle
from podium.methods.losses import soft_target_ce
from podium.methods.profiling import DeviceProfile
from podium.methods.shrinking.config import PhaseConfig, ShrinkingConfig, describe_space
from podium.methods.shrinking.latency import LatencyTable
from podium.methods.shrinking.predictor import AccuracyPredictor, encode_arch, train_accuracy_predictor
from podium.methods.shrinking.search import SearchResult, evolutionary_search
from podium.methods.shrinking.space import Arch, OpenSpace, _as_arch
from podium.methods.shrinking.supernet import OFASubnet, OFASupernet, extract_subnet
from podium.methods.train import TrainConfig, evaluate, fit, pick_device, recalibrate_bn, seeded, total_steps

log = logging.getLogger("podium.shrinking")

# the training images kept out of progressive shrinking: the accuracy predictor's targets are measured on them
HOLDOUT_SPLIT = "predictor_holdout"


def phase_loss(supernet: OFASupernet, teacher: nn.Module | None, space: OpenSpace, phase: PhaseConfig,
               cfg: ShrinkingConfig, rng: random.Random) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """Per step: the batch's resolution (the loader reads each batch at one of the open resolutions,
    elastic in every phase, as in OFA); teacher forward once (no grad, same resolution); the summed loss of ``subnets_per_step`` sub-networks sampled from the space
    open so far (CE with label smoothing + kd_weight * soft-target CE against the teacher)."""
    units = len(cfg.unit_widths)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor, _step: int) -> torch.Tensor:
        x, r = images, images.shape[-1]
        soft = None
        if teacher is not None and cfg.kd_weight > 0:
            with torch.no_grad():
                soft = teacher(x)
        total = x.new_zeros(())
        for _ in range(phase.subnets_per_step):
            supernet.set_active(space.sample(units, rng, r))  # the full network while only it is open
            out = supernet(x)
            loss = F.cross_entropy(out, labels, label_smoothing=cfg.label_smoothing)
            if soft is not None:
                loss = loss + cfg.kd_weight * soft_target_ce(out, soft)
            total = total + loss
        return total

    return loss_fn


def phase_train_config(cfg: ShrinkingConfig, phase: PhaseConfig, index: int, batches_per_epoch: int) -> TrainConfig:
    """The training of one phase: its epochs, step cap, learning rate (relative to the full network's)
    and warm-up (``phase.warmup_epochs``, in optimizer steps of this loader)."""
    phase_cfg = cfg.train.model_copy(update={"epochs": phase.epochs, "max_steps": phase.max_steps,
                                             "lr": cfg.train.lr * phase.lr_mult, "seed": cfg.train.seed + index})
    if phase.warmup_epochs > 0:
        per_epoch = math.ceil(batches_per_epoch / phase_cfg.accumulate)
        steps = total_steps(phase_cfg, per_epoch)
        warmup = min(steps - 1, round(phase.warmup_epochs * per_epoch))
        phase_cfg = phase_cfg.model_copy(update={"warmup_steps": warmup})
    return phase_cfg


def hold_out_for_predictor(data: DataBundle, images: int) -> DataBundle:
    """``data`` with ``images`` training images moved to :data:`HOLDOUT_SPLIT` (at most half of them)."""
    available = len(data.splits["train"]) // 2
    if images > available:
        log.warning("predictor.holdout_images=%d: the training split has %d images, holding out %d",
                    images, len(data.splits["train"]), available)
    return data.hold_out(min(images, available), HOLDOUT_SPLIT)


def describe(cfg: ShrinkingConfig, shape: DataShape, anchors: Sequence[AnchorSpec]) -> list[dict[str, Any]]:
    return [describe_space(cfg)]


@register_method('shrinking', ShrinkingConfig, describe)
class Shrinking(Method):
    """Once-for-All: train an elastic supernet by progressive shrinking, then search per device."""

    name = "shrinking"

    def __init__(self, cfg: ShrinkingConfig | None = None) -> None:
        self.cfg = cfg or ShrinkingConfig()

    def fit(self, data: DataBundle, anchors: Sequence[Anchor] = (), teacher: Anchor | None = None) -> "ShrinkSpace":
        """Progressive shrinking on the training split less ``predictor.holdout_images`` images, then
        the accuracy predictor, fitted to sub-networks' accuracies on those held-out images (as the
        official provider's ``valid_size``); ``val`` is read only to report candidates.

        The distillation teacher is the supernet's own full network after the first phase, as in
        the paper; ``anchors`` and ``teacher`` are not used by this method.
        """
        cfg = self.cfg
        data = hold_out_for_predictor(data, cfg.predictor.holdout_images)
        device = pick_device()
        with seeded(cfg.seed):
            supernet = OFASupernet(cfg, data.input_spec.channels, data.num_classes).to(device)
        rng = random.Random(cfg.seed)
        space = OpenSpace.largest(cfg)
        kd_teacher: nn.Module | None = None
        history = []
        for i, phase in enumerate(cfg.phases):
            trained, space = space, space.opened(phase, cfg)
            if phase.elastic == "width":  # the widths earlier width phases trained keep their channels
                supernet.sort_channels(keep_in_front=trained.expands)
            loader = data.train_loader(space.resolutions)
            loss_fn = phase_loss(supernet, kd_teacher, space, phase, cfg, rng)
            result = fit(supernet, loader, loss_fn, phase_train_config(cfg, phase, i, len(loader)),
                         name=f"shrinking/{phase.name}", rngs=[rng])
            history.append({"phase": phase.name, "steps": result.steps, "final_loss": result.final_loss,
                            "wall_s": result.wall_s, "kernels": list(space.kernels), "depths": list(space.depths),
                            "expands": list(space.expands)})
            if i == 0:
                kd_teacher = copy.deepcopy(supernet)
                kd_teacher.set_active(OpenSpace.full(cfg).uniform(len(cfg.unit_widths), "max"))
                kd_teacher.requires_grad_(False)
                kd_teacher.train()  # batch statistics, as OFA runs its teacher: valid at any resolution
        supernet.set_active(OpenSpace.full(cfg).uniform(len(cfg.unit_widths), "max"))
        out = ShrinkSpace(cfg, supernet.eval(), data)
        out.history = history
        out.fit_predictor()
        return out


class ShrinkSpace(CandidateSpace):
    """The trained supernet as a candidate space: a per-device search yields the best few sub-nets.

    ``data``'s ``train`` split is what the supernet trained on; :data:`HOLDOUT_SPLIT` holds the
    training images kept out of it. Sub-network accuracies are measured at the sub-network's
    resolution after BN recalibration on a fixed subset of ``train`` (``bn_recalibration_images``, as
    the official 2,000 training images; not the hold-out, whose images would then both set the
    statistics and score them): the accuracy predictor's targets on the hold-out, the candidates'
    ``val_acc`` on ``val``.
    """

    searches_per_device = True

    def __init__(self, cfg: ShrinkingConfig, supernet: OFASupernet, data: DataBundle) -> None:
        self.cfg, self.supernet, self.data = cfg, supernet, data
        self.space = OpenSpace.full(cfg)
        self.units = len(cfg.unit_widths)
        self.history: list[dict] = []
        self.predictor: AccuracyPredictor | None = None
        self.predictor_report: dict[str, float] = {}
        self.latency_tables: dict[str, LatencyTable] = {}
        self._cache: dict[str, list[Candidate]] = {}

    def report(self) -> dict[str, Any]:
        """The shrinking history (per phase: steps, final loss, wall time, choices open after it) and
        the accuracy predictor's numbers (error on held-out sub-networks, accuracies of the evaluated
        sub-networks on the held-out training images, how many of those images)."""
        return {"phases": [dict(h) for h in self.history], "predictor": dict(self.predictor_report)}

    # sub-networks -------------------------------------------------------------------------
    def subnet(self, arch: Arch | dict[str, Any]) -> OFASubnet:
        """Extracted, BN-recalibrated (at its resolution), eval-mode sub-network on CPU."""
        arch = _as_arch(arch)
        net = extract_subnet(self.supernet, arch).cpu()
        images = self.cfg.bn_recalibration_images
        recalibrate_bn(net, self.data.eval_loader("train", arch.resolution, limit=images))
        return net.eval()

    def evaluate_arch(self, arch: Arch | dict[str, Any], split: str = "val") -> float:
        """Accuracy of the extracted, BN-recalibrated sub-network on ``split`` at its resolution."""
        arch = _as_arch(arch)
        return evaluate(self.subnet(arch), self.data.eval_loader(split, arch.resolution))

    # accuracy predictor ---------------------------------------------------------------------
    def fit_predictor(self) -> dict[str, float]:
        """Evaluate random sub-networks (plus the extremes) on the held-out training images and fit the
        MLP accuracy predictor to those accuracies."""
        rng = random.Random(self.cfg.seed + 1)
        archs = [self.space.uniform(self.units, "max"), self.space.uniform(self.units, "min")]
        archs += [self.space.sample(self.units, rng) for _ in range(self.cfg.predictor.samples - len(archs))]
        accs = np.array([self.evaluate_arch(a, HOLDOUT_SPLIT) for a in archs], dtype=np.float32)
        feats = np.stack([encode_arch(a, self.cfg) for a in archs])
        self.predictor, self.predictor_report = train_accuracy_predictor(feats, accs, self.cfg.predictor, self.cfg.seed)
        self.predictor_report.update(mean_acc=float(accs.mean()), min_acc=float(accs.min()), max_acc=float(accs.max()),
                                     holdout_images=float(len(self.data.splits[HOLDOUT_SPLIT])))
        log.info("accuracy predictor: %s", {k: round(v, 4) for k, v in self.predictor_report.items()})
        return self.predictor_report

    def predict_acc(self, archs: Sequence[Arch]) -> np.ndarray:
        if self.predictor is None:
            self.fit_predictor()
        with torch.no_grad():
            feats = torch.as_tensor(np.stack([encode_arch(a, self.cfg) for a in archs]))
            return self.predictor(feats).numpy()

    # per-device search ----------------------------------------------------------------------
    def latency_table(self, device: DeviceProfile) -> LatencyTable:
        """The device's lookup table, calibrated on :meth:`calibration_archs`."""
        if device.name not in self.latency_tables:
            table = LatencyTable(self.supernet, device, self.cfg, self.space)
            table.calibrate(self.calibration_archs())
            self.latency_tables[device.name] = table
        return self.latency_tables[device.name]

    def calibration_archs(self, random_archs: int = 5) -> list[Arch]:
        """The whole networks the lookup table is calibrated on: the largest, middle and smallest, and a
        few random ones (seeded) so the layer count varies independently of the summed latency."""
        rng = random.Random(self.cfg.seed)
        return ([self.space.uniform(self.units, w) for w in ("max", "mid", "min")]
                + [self.space.sample(self.units, rng) for _ in range(random_archs)])

    def search(self, device: DeviceProfile) -> list[SearchResult]:
        table = self.latency_table(device)
        return evolutionary_search(self.space, self.units, self.predict_acc, table.predict,
                                   device.latency_budget_ms, self.cfg.evolution, self.cfg.seed)

    def make_candidate(self, arch: Arch, extra: dict[str, float] | None = None) -> Candidate:
        """Extract, recalibrate BN, evaluate on val and count complexity (``extra``: what the search knew)."""
        net = self.subnet(arch)
        size = (arch.resolution, arch.resolution)
        metrics: dict[str, float] = {"val_acc": evaluate(net, self.data.eval_loader("val", size))}
        metrics.update({k: float(v) for k, v in count(net, size, self.supernet.in_chans).as_dict().items()})
        metrics.update(extra or {})
        return Candidate(name=arch.name, method=Shrinking.name, config=arch.to_dict(), model=net,
                         input_size=size, metrics=metrics, in_chans=self.supernet.in_chans)

    def candidates(self, device: DeviceProfile | None = None) -> Iterator[Candidate]:
        """For a device: the top_k sub-networks of an evolutionary search under its latency budget,
        measured for real (cached per device name). Without one: largest, middle and smallest."""
        key = device.name if device is not None else ""
        if key not in self._cache:
            if device is None:
                archs = [self.space.uniform(self.units, w) for w in ("max", "mid", "min")]
                self._cache[key] = [self.make_candidate(a) for a in archs]
            else:
                results = self.search(device)[: self.cfg.top_k]
                table = self.latency_table(device)
                measured = table.measure_archs([r.arch for r in results])  # the predictor's check, logged
                self._cache[key] = [
                    self.make_candidate(r.arch, {"predicted_acc": r.predicted_acc,
                                                 "predicted_latency_ms": r.predicted_latency_ms, "p50_ms": p50,
                                                 "latency_budget_ms": device.latency_budget_ms,
                                                 "lut_entries": float(len(table.table))})
                    for r, p50 in zip(results, measured)]
                for c in self._cache[key]:
                    log.info("%s on %s: val %.3f, predicted %.2f ms, measured p50 %.2f ms (budget %.2f)", c.name,
                             device.name, c.metrics["val_acc"], c.metrics["predicted_latency_ms"],
                             c.metrics["p50_ms"], device.latency_budget_ms)
        yield from self._cache[key]

    # saved as data -------------------------------------------------------------------------
    def to_record(self) -> tuple[dict[str, Any], dict[str, nn.Module]]:
        """The supernet and the accuracy predictor with their configs; latency tables are measured again
        on the machine that searches (they are that machine's)."""
        if self.predictor is None:
            self.fit_predictor()
        record = {"cfg": self.cfg.model_dump(mode="json"), "in_chans": self.supernet.in_chans,
                  "num_classes": self.supernet.num_classes, "history": self.history,
                  "predictor_report": self.predictor_report}
        return record, {"supernet": self.supernet, "predictor": self.predictor}

    @classmethod
    def from_record(cls, record: dict[str, Any], weights: LoadWeights, data: DataBundle) -> ShrinkSpace:
        """The supernet and predictor rebuilt from the config; ``data`` less the same predictor hold-out as
        :meth:`Shrinking.fit` drew (the bundle's seed), so searches recalibrate on the same images."""
        cfg = ShrinkingConfig.model_validate(record["cfg"])
        supernet = weights("supernet", OFASupernet(cfg, record["in_chans"], record["num_classes"]))
        supernet.set_active(OpenSpace.full(cfg).uniform(len(cfg.unit_widths), "max"))
        space = cls(cfg, supernet.eval(), hold_out_for_predictor(data, cfg.predictor.holdout_images))
        features = len(encode_arch(space.space.uniform(space.units, "max"), cfg))
        space.predictor = weights("predictor", AccuracyPredictor(features, cfg.predictor.hidden,
                                                                  cfg.predictor.layers)).eval()
        space.history = [dict(h) for h in record["history"]]
        space.predictor_report = dict(record["predictor_report"])
        return space

    def candidate_module(self, name: str, config: dict[str, Any]) -> nn.Module:
        arch = Arch.from_dict(config)
        if arch.name != name:
            raise ValueError(f"candidate {name!r} does not match its architecture {arch.name!r}")
        return extract_subnet(self.supernet, arch).cpu().eval()


Shrinking.space_type = ShrinkSpace  # defined after the method, which names it in its signatures
