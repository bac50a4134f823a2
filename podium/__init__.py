"""Podium: one winning model per target device.

Importing ``podium`` is cheap (no torch, Prefect or MLflow): the deployment API below is loaded on
first use (PEP 562), so a deployment script pays only for what it calls::

    from podium import open_store, fetch_release, ReleasedModel
"""
import os

# No internet here and no telemetry wanted anywhere: set before prefect/mlflow/dvc are imported.
for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "podium",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # CLI commands outside a flow (fetch) log locally
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",  # first start runs migrations
}.items():
    os.environ.setdefault(_key, _value)

import logging as _logging

_logging.getLogger("podium").setLevel(_logging.INFO)  # Prefect shows it (extra logger); root stays at WARNING

# The deployment API: name -> the module defining it (imported on first access).
_LAZY = {
    "open_store": "podium.registry.stores",
    "fetch_release": "podium.registry.release",
    "read_fetch_marker": "podium.registry.release",
    "fetch_or_reuse": "podium.predict",
    "ReleasedModel": "podium.predict",
    "Prediction": "podium.predict",
    "PodiumError": "podium.errors",
}
__all__ = list(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'podium' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
