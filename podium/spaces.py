"""Describe a method's candidate space for a config without training (for `podium space show`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from podium.config import ConfigError, PodiumConfig
from podium.data import decode_image, image_files


def data_shape(cfg: PodiumConfig, project_dir: Path = Path(".")) -> tuple[int, int]:
    """(num_classes, in_chans) of the configured dataset; (10, 1) when it is not exported yet."""
    train = project_dir / cfg.data.path / "train"
    if not train.is_dir():
        return (len(cfg.data.classes) if cfg.data.classes else 10), 1
    class_dirs = sorted(p for p in train.iterdir() if p.is_dir())
    first = next((f for d in class_dirs for f in image_files(d)), None)
    in_chans = decode_image(first).shape[0] if first is not None else 1
    return (len(cfg.data.classes) if cfg.data.classes else len(class_dirs)), in_chans


def describe(cfg: PodiumConfig, method: str, project_dir: Path = Path(".")) -> list[dict[str, Any]]:
    if method not in cfg.methods:
        raise ConfigError(f"method {method!r} is not configured; configured: {', '.join(cfg.methods) or 'none'}")
    num_classes, in_chans = data_shape(cfg, project_dir)
    method_cfg = cfg.method_config(method)
    if method == "stitching":
        from methods.stitching import describe_space

        return describe_space([a.arch for a in cfg.anchors], num_classes, in_chans, tuple(cfg.data.image_size),
                              method_cfg, names=[a.name for a in cfg.anchors])
    if method == "scaling":
        from methods.scaling import describe_scales

        return describe_scales(method_cfg, num_classes, in_chans)
    if method == "self_distill":
        from methods.self_distill import describe_space

        return [describe_space(method_cfg, num_classes, in_chans)]
    from methods.shrinking import describe_space

    return [describe_space(method_cfg)]
