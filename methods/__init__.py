"""Podium's model-side library: pure PyTorch + timm.

Nothing here imports orchestration or storage (Prefect, MLflow, boto3): every method is usable
from a notebook, e.g. ``space = Stitching(cfg).fit(data, anchors)``.
"""
