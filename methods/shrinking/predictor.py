"""Accuracy predictor: an MLP over an architecture's encoding, trained on evaluated sub-networks."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from podium.methods.shrinking.config import PredictorConfig, ShrinkingConfig
from podium.methods.shrinking.space import Arch


def encode_arch(arch: Arch, cfg: ShrinkingConfig) -> np.ndarray:
    """Per block slot one-hot(K) and one-hot(E) (zeros for skipped blocks) + one-hot(resolution)."""
    ks, es, rs = sorted(cfg.kernel_choices), sorted(cfg.expand_choices), sorted(cfg.resolutions)
    slot = len(ks) + len(es)
    vec = np.zeros(len(cfg.unit_widths) * cfg.max_depth * slot + len(rs), dtype=np.float32)
    for u, (kernels, expands) in enumerate(zip(arch.kernels, arch.expands)):
        for i, (k, e) in enumerate(zip(kernels, expands)):
            base = (u * cfg.max_depth + i) * slot
            vec[base + ks.index(k)] = 1.0
            vec[base + len(ks) + es.index(e)] = 1.0
    vec[-len(rs) + rs.index(arch.resolution)] = 1.0
    return vec


class AccuracyPredictor(nn.Module):
    """MLP (ReLU hidden layers) predicting accuracy as an offset from a fixed base accuracy."""

    def __init__(self, in_features: int, hidden: int = 400, layers: int = 3, base_acc: float = 0.0) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        width = in_features
        for _ in range(layers):
            mods += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        mods.append(nn.Linear(width, 1, bias=False))
        self.mlp = nn.Sequential(*mods)
        self.register_buffer("base_acc", torch.tensor(float(base_acc)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x).squeeze(-1) + self.base_acc


def train_accuracy_predictor(features: np.ndarray, targets: np.ndarray, cfg: PredictorConfig,
                             seed: int = 0) -> tuple[AccuracyPredictor, dict[str, float]]:
    """Fit the MLP (Adam, MSE) on all but a held-out fraction of the sub-networks; report its error on them."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    n = len(targets)
    order = torch.randperm(n, generator=gen)
    n_hold = int(round(cfg.subnet_holdout_fraction * n)) if n >= 10 else 0
    hold, train = order[:n_hold], order[n_hold:]
    x = torch.as_tensor(features)
    y = torch.as_tensor(targets, dtype=torch.float32)
    model = AccuracyPredictor(x.shape[1], cfg.hidden, cfg.layers, base_acc=float(y[train].mean()))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.epochs):
        perm = train[torch.randperm(len(train), generator=gen)]
        for chunk in perm.split(128):
            loss = F.mse_loss(model(x[chunk]), y[chunk])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    report: dict[str, float] = {"samples": float(n)}
    with torch.no_grad():
        if n_hold:
            pred = model(x[hold]).numpy()
            true = y[hold].numpy()
            report["holdout_mae"] = float(np.abs(pred - true).mean())
            report["holdout_rmse"] = float(np.sqrt(((pred - true) ** 2).mean()))
            if len(true) > 2 and true.std() > 0 and pred.std() > 0:
                report["holdout_pearson"] = float(np.corrcoef(pred, true)[0, 1])
        report["train_mae"] = float((model(x[train]) - y[train]).abs().mean())
    return model, report
