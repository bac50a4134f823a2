"""Podium: one winning model per target device."""
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
