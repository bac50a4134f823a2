"""The `profile` flow: measure exported models ON a remote device, for the retrain run that asked.

A Prefect worker running on the device's hardware polls that device's work pool and executes this
flow (deployed once per pool with ``podium deploy-profiler --work-pool P``). The retrain side
(`tasks.profile`) uploads each candidate's ONNX graph and safetensors weights to the run's artifact
store (a local folder or ``s3://``: the one place both sides can reach), passes the device profile
and the list of models as JSON parameters, waits for the run, and reads the answer back from the
store. Nothing is unpickled and no PyTorch module is rebuilt here: the device only needs the ONNX
file.

Each model arrives as the artifact of the device's own runtime (ONNX for ONNX Runtime, the IR pair
for OpenVINO, ``model.pt2`` for torch, ``model.pte`` for ExecuTorch), each file checked against the
sha256 the requesting run recorded before anything opens it; so the stats a device returns are its
runtime's, in the precision the model was built in.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from podium.errors import ProfileRequestError
from podium.files import sha256_file
from podium.flows.run_logs import forward_podium_logs
from podium.methods.profiling import Artifact, DeviceProfile, measure_against_budget
from podium.registry.release import check_name
from podium.registry.stores import ArtifactStore, open_store

REPO_ROOT = Path(__file__).resolve().parents[1]


def measure_models(device: DeviceProfile, models: list[dict[str, Any]], store: ArtifactStore,
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> dict[str, dict]:
    """Download each model's artifact files, check their sha256, and measure them all with the device's
    runtime, the way local devices are (one pinned process, interleaved rounds); {name: LatencyStats dict}.

    Any bad model fails the whole request: a partial answer would silently drop candidates from the race.
    """
    log = logger or logging.getLogger("podium.flows.device_profile")
    artifacts = []
    with tempfile.TemporaryDirectory(prefix="podium-profile-") as tmp:
        for i, model in enumerate(models):
            name, files, main = model.get("name"), model.get("files"), model.get("main")
            shape = model.get("input_shape")
            if not (isinstance(name, str) and isinstance(files, list) and files and isinstance(main, str)
                    and isinstance(shape, list) and len(shape) == 3):
                raise ProfileRequestError(f"model #{i}: expected name, files, main and a 3-item input_shape, "
                                          f"got {model}")
            if model.get("runtime", device.runtime) != device.runtime:
                raise ProfileRequestError(f"model {name!r} is a {model.get('runtime')} artifact; device {device.name} "
                                          f"runs {device.runtime}")
            folder = Path(tmp) / str(i)
            folder.mkdir()
            for entry in files:
                local = folder / check_name(entry.get("name"))
                store.get_file(entry["key"], local)
                if sha256_file(local) != entry.get("sha256"):
                    raise ProfileRequestError(f"model {name!r}: {entry['key']} does not match its sha256")
            artifacts.append(Artifact(name, folder / check_name(main), (int(shape[0]), int(shape[1]), int(shape[2])),
                                      str(model.get("precision", "fp32"))))
        measured = measure_against_budget(artifacts, device)
    for name, stats in measured.items():
        log.info("%s on %s: p50 %s, %.1f MB (%d rounds%s)", name, device.name, stats.interval_text(),
                 stats.peak_mem_mb, stats.rounds, f"; {stats.interference}" if stats.interference else "")
    return {name: stats.as_dict() for name, stats in measured.items()}


@flow(name="profile", log_prints=True)
def profile(device: dict[str, Any], models: list[dict[str, Any]], store_uri: str,
            store_endpoint_url: str | None = None, result_key: str | None = None) -> dict[str, dict]:
    """Measure ``models`` on this machine with ``device``'s settings.

    ``device`` is ``DeviceProfile.model_dump(mode="json")``; each model is ``{"name", "runtime",
    "precision", "main" (the file a session opens), "files": [{"key", "name", "sha256"}],
    "input_shape": [C, H, W]}``. The
    answer ``{candidate name: LatencyStats.as_dict()}`` is returned and, when ``result_key`` is
    given, also written to the store as JSON (the caller's machine cannot read this worker's
    local Prefect result storage).
    """
    forward_podium_logs()  # the per-model lines (podium.* loggers) in this run's logs, on the worker too
    logger = get_run_logger()
    profile_ = DeviceProfile.model_validate(device)
    store = open_store(store_uri, store_endpoint_url)
    results = measure_models(profile_, models, store)
    if result_key:
        store.put_bytes(result_key, json.dumps(results, sort_keys=True).encode())
    logger.info("profiled %d models for device %s", len(results), profile_.name)
    return results


def deploy_profiler(work_pool: str, source: Path | str = REPO_ROOT) -> str:
    """Create or update the profile deployment for ``work_pool``; returns its full name.

    The worker on the device runs the flow from ``source`` (a checkout of this repository on that
    machine, or a git URL), so the device needs the repository and its Python environment.
    """
    from podium.tasks.profile import profiler_deployment

    flow_name, deployment_name = profiler_deployment(work_pool).split("/", 1)
    remote = profile.from_source(source=str(source), entrypoint="flows/device_profile.py:profile")
    remote.deploy(name=deployment_name, work_pool_name=work_pool, print_next_steps=False)
    return f"{flow_name}/{deployment_name}"
