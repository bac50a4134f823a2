"""The `profile` flow: measure exported models ON a remote device, for the retrain run that asked.

A Prefect worker running on the device's hardware polls that device's work pool and executes this
flow (deployed once per pool with ``podium deploy-profiler --work-pool P``). The retrain side
(`tasks.profile`) uploads each candidate's ONNX graph and safetensors weights to the run's artifact
store (a local folder or ``s3://``: the one place both sides can reach), passes the device profile
and the list of models as JSON parameters, waits for the run, and reads the answer back from the
store. Nothing is unpickled and no PyTorch module is rebuilt here: the device only needs the ONNX
file.

Runtime choice for ``torch`` devices: a candidate is an arbitrary standalone ``nn.Module`` (stitched
networks, elastic sub-networks, early exits) whose Python class cannot be rebuilt safely from its
weights alone, and the only safe, self-describing artifact is the ONNX graph. So a ``torch`` device
is measured with ONNX Runtime on that graph at the device's threads and batch size, and the stats
say so: their ``runtime`` field is ``"onnxruntime"`` (not ``"torch"``) and the run logs a warning.
Eager-PyTorch latency on a remote device is therefore not available; devices that need it should be
profiled locally (no ``work_pool``) or switched to ``runtime: onnxruntime``.
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
from podium.methods.profiling import DeviceProfile, measure
from podium.methods.runtimes import remote_runtime
from podium.registry.stores import ArtifactStore, open_store

REPO_ROOT = Path(__file__).resolve().parents[1]


def measure_models(device: DeviceProfile, models: list[dict[str, Any]], store: ArtifactStore,
                   logger: logging.Logger | logging.LoggerAdapter | None = None) -> dict[str, dict]:
    """Download each model's ONNX graph, check its sha256, and measure it; {name: LatencyStats dict}.

    Models are measured one after another (measurements must not overlap on the device). Any bad
    model fails the whole request: a partial answer would silently drop candidates from the race.
    """
    log = logger or logging.getLogger("podium.flows.device_profile")
    runtime = remote_runtime(device.runtime)
    if runtime.name != device.runtime:
        log.warning("device %s asks for runtime %s: measuring the exported graph with %s instead (a remote "
                    "device never rebuilds PyTorch modules); stats are labelled %s", device.name, device.runtime,
                    runtime.name, runtime.name)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="podium-profile-") as tmp:
        for i, model in enumerate(models):
            name, key, shape = model.get("name"), model.get("onnx"), model.get("input_shape")
            if not (isinstance(name, str) and isinstance(key, str) and isinstance(shape, list) and len(shape) == 3):
                raise ProfileRequestError(f"model #{i}: expected name, onnx key and a 3-item input_shape, got {model}")
            local = Path(tmp) / f"{i}-{runtime.artifact_name}"
            store.get_file(key, local)
            expected = model.get("onnx_sha256")
            if expected and sha256_file(local) != expected:
                raise ProfileRequestError(f"model {name!r}: {key} does not match its sha256")
            stats = measure(None, (int(shape[0]), int(shape[1]), int(shape[2])), device, artifact=local,
                            runtime=runtime.name)
            results[name] = stats.as_dict()
            log.info("%s on %s: p50 %.3f ms (%d runs)", name, device.name, stats.p50_ms, stats.runs)
            local.unlink()
    return results


@flow(name="profile", log_prints=True)
def profile(device: dict[str, Any], models: list[dict[str, Any]], store_uri: str,
            store_endpoint_url: str | None = None, result_key: str | None = None) -> dict[str, dict]:
    """Measure ``models`` on this machine with ``device``'s settings.

    ``device`` is ``DeviceProfile.model_dump(mode="json")``; each model is ``{"name", "onnx" (store
    key), "weights" (store key, not needed here), "onnx_sha256", "input_shape": [C, H, W]}``. The
    answer ``{candidate name: LatencyStats.as_dict()}`` is returned and, when ``result_key`` is
    given, also written to the store as JSON (the caller's machine cannot read this worker's
    local Prefect result storage).
    """
    logger = get_run_logger()
    profile_ = DeviceProfile.model_validate(device)
    store = open_store(store_uri, store_endpoint_url)
    results = measure_models(profile_, models, store, logger)
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
