"""Podium's model-side library: pure PyTorch + timm (+ the deployment runtimes it measures with).

Nothing here imports orchestration or storage (Prefect, MLflow, boto3): every method is usable
from a notebook, e.g. ``space = Stitching(cfg).fit(data, anchors)``.

Importing the package fills its registries (timm style): model families
(:mod:`podium.methods.families`), runtimes (:mod:`podium.methods.runtimes`) and methods
(:mod:`podium.methods.catalog`), each registered by its defining module.
"""
from podium.methods.discovery import import_submodules

import_submodules(__name__, __path__)  # every method module registers itself: a new method is one new file
