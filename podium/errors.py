"""Every error Podium reports as one line, at the bottom of the import graph.

Each layer raises its own subclass; the CLI catches :class:`PodiumError` and prints ``error: <message>``
with a non-zero exit. The message is always one line naming the problem and where it is.
"""
from __future__ import annotations


class PodiumError(Exception):
    """A failure Podium can name in one line (no traceback for the user)."""


class ConfigError(PodiumError, ValueError):
    """A bad configuration (one line: file, field path, problem)."""


class DeviceError(PodiumError, ValueError):
    """An unknown device or an invalid inventory entry."""


class DataError(PodiumError, RuntimeError):
    """A dataset or DVC operation failed."""


class DataValidationError(PodiumError, ValueError):
    """The dataset failed validation (failed expectations, counts, an example path)."""


class StoreError(PodiumError):
    """A store operation failed.

    ``kind`` lets callers react without parsing text: ``missing`` (no such object), ``no_bucket``,
    ``unreachable``, ``server`` (a 5xx or throttling answer), ``credentials``, ``denied``,
    ``invalid`` (bad key or URI) or ``other``.
    """

    def __init__(self, message: str, kind: str = "other") -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def transient(self) -> bool:
        """Worth trying again later: the endpoint was down, slow or overloaded."""
        return self.kind in ("unreachable", "server")


class ReleaseError(PodiumError):
    """A release could not be published, found or verified."""


class RegistryError(PodiumError, RuntimeError):
    """A registry operation failed."""


class AnchorError(PodiumError, RuntimeError):
    """An anchor or teacher could not be acquired."""


class BranchError(PodiumError, RuntimeError):
    """Some methods or devices failed; the rest of the run finished (one line naming each failure)."""


class StackError(PodiumError, RuntimeError):
    """The local MLflow/Prefect stack could not be started or stopped."""


class DistributedTrainingError(PodiumError, RuntimeError):
    """A torchrun job failed (with the last line it printed)."""


class ProfileRequestError(PodiumError, ValueError):
    """A malformed remote profiling request, or a model file that does not match its checksum."""


def first_line(exc: BaseException) -> str:
    """An exception as one line for an error message (its first line, at most 300 characters)."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
