"""Prefect artifacts of a run: stable keys, the MLflow run link, and a training's progress bar.

Artifacts are a view of what the tasks computed, never a reason to fail one: outside a Prefect run
nothing is created, and an API that refuses costs one warning line.
"""
from __future__ import annotations

import contextvars
import logging
import queue
import re
import threading
from collections.abc import Callable
from typing import Any
from uuid import UUID

from podium.errors import first_line

log = logging.getLogger("podium.tasks.artifacts")


def artifact_key(*parts: str) -> str:
    """A key Prefect accepts and the UI lists: lowercase letters, digits and single dashes
    (``artifact_key("digits", "front", "CPU_1t")`` is ``digits-front-cpu-1t``)."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    if not key:
        raise ValueError(f"no artifact key can be made of {parts!r}")
    return key


def in_prefect_run() -> bool:
    """Inside a flow or task run (artifacts attach to it); False for a plain function call (``task.fn``)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def publish(what: str, create: Callable[[], Any]) -> Any:
    """``create()`` inside a Prefect run; None outside one, or after one warning when the API refuses."""
    if not in_prefect_run():
        return None
    try:
        return create()
    except Exception as exc:  # noqa: BLE001 - a view of the results must not fail the task that made them
        log.warning("Prefect artifact %s not created: %s", what, first_line(exc))
        return None


def mlflow_run_link(tracking_uri: str, experiment_id: str | None, run_id: str) -> str:
    """Markdown naming the MLflow run: a link into the MLflow UI when tracking is an ``http(s)`` server,
    else the run id and where it is stored."""
    if tracking_uri.startswith(("http://", "https://")) and experiment_id is not None:
        url = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return f"[MLflow run {run_id}]({url})"
    return f"MLflow run `{run_id}` in `{tracking_uri}`"


class TrainingProgress:
    """A progress artifact (key ``<model>-train-<method>``) following one method's training.

    Called as ``progress(name, step, steps, metrics)`` it is the training loop's ``TrainingEnv.on_progress``
    hook: each progress line of a ``fit`` moves the bar (a method that trains in phases restarts it
    per phase; the description names the phase). ``finish`` fills it when the method is trained.

    The training never waits for the API: updates are queued, in order, to a sender thread of their own.
    An ephemeral Prefect server's SQLite has held its lock for ~55 s (``database is locked``) while two
    trainings, whose only synchronous Prefect calls these are, logged nothing; a stalled API now delays
    the bar, not the training. ``finish``
    waits up to ``FINISH_WAIT_S`` for the queue to be sent, so a run's bar is full when its task ends."""

    FINISH_WAIT_S = 10.0

    def __init__(self, model_name: str, method: str) -> None:
        self.method = method
        self.key = artifact_key(model_name, "train", method)
        self.artifact_id: UUID | None = None
        self.enabled = in_prefect_run()
        self._queue: queue.Queue[tuple[float, str] | None] = queue.Queue()
        self._sender: threading.Thread | None = None

    def start(self) -> None:
        self._send(0.0, f"{self.method}: starting")

    def __call__(self, name: str, step: int, steps: int, metrics: dict[str, float] | None = None) -> None:
        self._send(100.0 * step / max(steps, 1), f"{self.method}: {name} step {step}/{steps}")

    def finish(self, description: str) -> None:
        self._send(100.0, f"{self.method}: {description}")
        sender = self._sender
        self.close()
        if sender is not None:
            sender.join(self.FINISH_WAIT_S)

    def close(self) -> None:
        """End the sender after what is queued (``finish`` does; a failed training's ``finally`` too)."""
        if self._sender is not None:
            self._queue.put(None)
            self._sender = None

    def _send(self, percent: float, description: str) -> None:
        if not self.enabled:
            return
        if self._sender is None:  # started in this task's context: the artifact attaches to its run
            self._sender = threading.Thread(target=contextvars.copy_context().run, args=(self._drain,),
                                            name=f"progress-{self.key}", daemon=True)
            self._sender.start()
        self._queue.put((percent, description))

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.enabled:
                self._post(*item)

    def _post(self, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        try:
            if self.artifact_id is None:
                self.artifact_id = create_progress_artifact(percent, key=self.key, description=description)
            else:
                update_progress_artifact(self.artifact_id, percent, description=description)
        except Exception as exc:  # noqa: BLE001 - the training goes on without its progress bar
            self.enabled = False
            log.warning("%s: progress artifact %s disabled: %s", self.method, self.key, first_line(exc))
