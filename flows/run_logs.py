"""Podium's own log lines (the ``podium`` logger) in the flow run's logs, however the run was started.

Prefect gives an "extra logger" its API handler inside ``setup_logging``, which runs when ``prefect``
is first imported, reading ``PREFECT_LOGGING_EXTRA_LOGGERS``. ``podium/__init__.py`` sets that
variable, which is enough when Podium is imported before Prefect (the CLI, the tests). A worker
imports Prefect first and the flow's module later, so in a worker-started run the variable comes too
late and only ``prefect.*`` lines reached the API. Every Podium flow therefore calls
:func:`forward_podium_logs` as it starts.
"""
from __future__ import annotations

import logging
import threading

PODIUM_LOGGER = "podium"
_lock = threading.Lock()


def forward_podium_logs() -> logging.Handler:
    """Give the ``podium`` logger Prefect's API log handler unless it already has one (idempotent;
    thread-safe). Returns the handler it has. Records are tied to the run in whose context they are
    emitted, so one handler serves every run of the process."""
    from prefect.logging.handlers import APILogHandler

    logger = logging.getLogger(PODIUM_LOGGER)
    with _lock:
        present = next((h for h in logger.handlers if isinstance(h, APILogHandler)), None)
        if present is not None:
            return present
        # the instance Prefect configured for its extra loggers (level and formatter as configured), if any
        configured = next((h for h in logging.getLogger("prefect.extra").handlers if isinstance(h, APILogHandler)),
                          None)
        handler = configured or APILogHandler()
        logger.addHandler(handler)
        return handler
