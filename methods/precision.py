"""What a precision costs and keeps: calibration images for INT8 and the accuracy of any artifact.

A derived (FP16/INT8) model's accuracy is never assumed from its FP32 parent: it is measured by
running the artifact in its own runtime on the validation split (:func:`artifact_accuracy`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from podium.methods.data import DataBundle
from podium.methods.runtimes import Source, get_runtime


def calibration_batches(data: DataBundle, size: tuple[int, int], images: int, batch_size: int = 32
                        ) -> list[np.ndarray]:
    """``images`` training images (evenly spread over the split, eval preprocessing: what inference sees),
    normalised, as float32 NCHW batches at ``size``."""
    return [batch.numpy() for batch, _ in data.eval_loader("train", size, limit=images, batch_size=batch_size)]


def artifact_accuracy(runtime: str, source: Source, data: DataBundle, size: tuple[int, int], split: str = "val",
                      threads: int = 1, limit: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] of ``source`` run by ``runtime`` on ``split`` at ``size``."""
    correct = total = 0
    with get_runtime(runtime).open(source if not isinstance(source, str) else Path(source), threads) as session:
        for images, labels in data.eval_loader(split, size, limit=limit):
            logits = session.predict(images.numpy())
            correct += int((np.argmax(logits, axis=1) == labels.numpy()).sum())
            total += labels.numel()
    return correct / max(total, 1)
