"""Podium's model-side library: pure PyTorch + timm (+ the deployment runtimes it measures with).

Nothing here imports orchestration or storage (Prefect, MLflow, boto3): every method is usable
from a notebook, e.g. ``space = Stitching(cfg).fit(data, anchors)``.

Registries are filled by their defining modules (timm style): model families
(:mod:`podium.methods.families`) and runtimes (:mod:`podium.methods.runtimes`) when their package is
imported, methods (:mod:`podium.methods.catalog`) on the catalogue's first lookup. Importing this
package itself imports nothing, so a light consumer (the runtimes' fresh-process memory probe) does
not pay for torch and timm.
"""
