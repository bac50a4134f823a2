"""Trained spaces and their offers are cached as data (safetensors + a JSON record), never as pickles.

Round trips: each of the four methods' spaces, saved and loaded back, offers the same candidates
(names, configs, metrics) computing the same outputs, and so do its saved offers. Trust: a record
that fails verification is recomputed, and a pickle planted where Prefect used to keep these results,
or in place of the tensors, never runs (its payload would create a marker file).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from podium.files import sha256_bytes
from podium.methods.base import Anchor, CandidateSpace
from podium.methods.families import build
from podium.methods.scaling.config import ScalingConfig
from podium.methods.scaling.method import Scaling
from podium.methods.self_distill import SelfDistill, SelfDistillConfig
from podium.methods.shrinking.config import ShrinkingConfig
from podium.methods.shrinking.method import Shrinking
from podium.methods.space_store import RECORD, TENSORS, UnusableRecord, load_offers, load_space, save_offers
from podium.methods.stitching.method import Stitching, StitchingConfig
from podium.methods.train import TrainConfig, fit_method
from tests.flow_helpers import METHODS, REPO, write_config

torch.set_num_threads(1)

TINY_TRAIN = TrainConfig(epochs=1, max_steps=3, lr=0.05, warmup_steps=0)


class PlantedPayload:
    """Unpickling this touches ``marker``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _stitching(digits) -> CandidateSpace:
    anchors = []
    for name, arch in (("small", {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}),
                       ("large", {"family": "resnet", "layers": [1, 2, 1, 1], "channels": [24, 48, 96, 192]})):
        torch.manual_seed(0)
        anchors.append(Anchor(name, build(arch, digits.num_classes, 1).eval(), source="trained", arch=arch))
    cfg = StitchingConfig(joint_training=False, ls_batches=1, bn_recalibration_batches=1)
    return fit_method(Stitching(cfg), digits, anchors)


def _shrinking(digits) -> CandidateSpace:
    cfg = ShrinkingConfig.model_validate({**METHODS["shrinking"], "predictor": {"samples": 4, "hidden": 8,
                                                                              "epochs": 2, "holdout_images": 64}})
    return fit_method(Shrinking(cfg), digits)


def _scaling(digits) -> CandidateSpace:
    return fit_method(Scaling(ScalingConfig(scales=[1, 2], train=TINY_TRAIN)), digits)


def _self_distill(digits) -> CandidateSpace:
    cfg = SelfDistillConfig(train=TINY_TRAIN, early_exit_threshold=None)  # baseline on: it is saved too
    return fit_method(SelfDistill(cfg), digits)


BUILDERS = {"stitching": _stitching, "shrinking": _shrinking, "scaling": _scaling, "self_distill": _self_distill}


def _assert_same_candidates(expected: list, got: list) -> None:
    assert [c.name for c in got] == [c.name for c in expected]
    torch.manual_seed(1)
    for want, have in zip(expected, got):
        assert (have.method, have.config, have.metrics) == (want.method, json.loads(json.dumps(want.config)),
                                                            want.metrics)
        assert (tuple(have.input_size), have.in_chans) == (tuple(want.input_size), want.in_chans)
        x = torch.randn(2, want.in_chans, *want.input_size)
        with torch.no_grad():
            torch.testing.assert_close(have.model.eval()(x), want.model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_a_saved_space_and_its_offers_load_back_the_same(method, digits, tmp_path):
    """Saving and loading loses nothing a run uses: candidates, their outputs, report, tables, cost;
    offers load back through the space's own builders."""
    space = BUILDERS[method](digits)
    expected = list(space.candidates())
    space.save(tmp_path / "space", key="k1")
    assert {p.name for p in (tmp_path / "space").iterdir()} == {RECORD, TENSORS}
    loaded = load_space(tmp_path / "space", digits, key="k1")
    assert type(loaded) is type(space)
    _assert_same_candidates(expected, list(loaded.candidates()))
    assert loaded.report() == space.report() and loaded.tables() == space.tables()
    assert loaded.training_cost == space.training_cost

    save_offers({"dev-a": expected, "dev-b": expected[:1]}, tmp_path / "offers", key="o1")
    offers = load_offers(tmp_path / "offers", loaded, key="o1")
    _assert_same_candidates(expected, offers["dev-a"])
    _assert_same_candidates(expected[:1], offers["dev-b"])
    assert offers["dev-b"][0].model is offers["dev-a"][0].model  # offered to both: rebuilt once, shared


@pytest.fixture(scope="module")
def saved_scaling(digits, tmp_path_factory) -> tuple[CandidateSpace, Path]:
    space = _scaling(digits)
    folder = tmp_path_factory.mktemp("saved") / "space"
    space.save(folder, key="k1")
    return space, folder


def _copy(folder: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in (RECORD, TENSORS):
        (dest / name).write_bytes((folder / name).read_bytes())
    return dest


def test_a_record_that_does_not_verify_is_refused(saved_scaling, digits, tmp_path):
    """Another key, another schema, tensors that differ from their digest or a record that is not JSON:
    each is refused with one line saying why, never loaded."""
    _, folder = saved_scaling
    with pytest.raises(UnusableRecord, match="key is 'k1', expected 'other'"):
        load_space(folder, digits, key="other")

    schema = _copy(folder, tmp_path / "schema")
    record = json.loads((schema / RECORD).read_text())
    (schema / RECORD).write_text(json.dumps({**record, "schema": 0}))
    with pytest.raises(UnusableRecord, match="schema is 0"):
        load_space(schema, digits, key="k1")

    flipped = _copy(folder, tmp_path / "flipped")
    data = bytearray((flipped / TENSORS).read_bytes())
    data[-1] ^= 0xFF
    (flipped / TENSORS).write_bytes(bytes(data))
    with pytest.raises(UnusableRecord, match="does not match the digest"):
        load_space(flipped, digits, key="k1")

    garbled = _copy(folder, tmp_path / "garbled")
    (garbled / RECORD).write_text("{not json")
    with pytest.raises(UnusableRecord, match="unreadable"):
        load_space(garbled, digits, key="k1")


def test_a_pickle_in_place_of_the_tensors_never_runs(saved_scaling, digits, tmp_path):
    """A planted pickle whose digest the record carries (an attacker can write both files): it passes
    the digest, is refused as not being safetensors, and its payload never runs."""
    _, folder = saved_scaling
    marker = tmp_path / "pwned"
    planted = _copy(folder, tmp_path / "planted")
    payload = pickle.dumps(PlantedPayload(marker))
    (planted / TENSORS).write_bytes(payload)
    record = json.loads((planted / RECORD).read_text())
    (planted / RECORD).write_text(json.dumps({**record, "tensors_sha256": sha256_bytes(payload)}))
    with pytest.raises(UnusableRecord, match="does not parse"):
        load_space(planted, digits, key="k1")
    assert not marker.exists()


def test_record_whose_weights_do_not_fit_its_architecture_is_refused(saved_scaling, digits, tmp_path):
    """The record is what builds the module: weights of another shape are an unusable record, not a crash."""
    _, folder = saved_scaling
    other = _copy(folder, tmp_path / "other")
    record = json.loads((other / RECORD).read_text())
    record["space"]["num_classes"] = 7
    (other / RECORD).write_text(json.dumps(record))
    with pytest.raises(UnusableRecord, match="do not fit the rebuilt module"):
        load_space(other, digits, key="k1")


# ---------------------------------------------------------------------------------------------
# The flow: what is planted in the cache folder never runs, and the run recomputes and succeeds
# ---------------------------------------------------------------------------------------------

def _prefect_record(payload: object, storage_key: Path) -> bytes:
    """A result file as Prefect wrote them for these tasks (cloudpickle inside a JSON record)."""
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

    return ResultRecord(metadata=ResultRecordMetadata(storage_key=str(storage_key)), result=payload).serialize()


@pytest.mark.integration
def test_planted_results_never_run_and_the_run_recomputes(prefect_harness, services, tmp_path):
    from prefect._internal.result_records import ResultRecord

    from podium.flows.retrain import run_retrain

    root = services["root"]
    devices = {"inventory": str(root / "devices.yaml"), "use": ["cpu-1t"]}
    config = write_config(services, tmp_path / "config.yaml", methods={"scaling": METHODS["scaling"]},
                          devices=devices, runtime={"cache_dir": str(tmp_path / "cache"), "max_workers": 1})
    first = run_retrain(str(config), str(REPO))
    assert first.cached_methods == [] and first.outcomes
    cache = tmp_path / "cache"
    [space_dir] = (cache / "spaces").iterdir()
    [offer_dir] = (cache / "offers").iterdir()
    assert not (cache / "results").exists()  # Prefect persisted nothing

    # Where the old tasks' results were read from: Prefect result records around a payload that runs.
    marker = tmp_path / "pwned"
    results = cache / "results"
    results.mkdir()
    for name in (f"train-{space_dir.name}", f"offer-{offer_dir.name}"):
        (results / name).write_bytes(_prefect_record(PlantedPayload(marker), results / name))
    ResultRecord.deserialize((results / f"train-{space_dir.name}").read_bytes())
    assert marker.exists()  # the plant is live: Prefect's own reader runs it
    marker.unlink()
    # In the new cache: the space's tensors swapped for a pickle (digest updated), the offers' corrupted.
    payload = pickle.dumps(PlantedPayload(marker))
    (space_dir / TENSORS).write_bytes(payload)
    record = json.loads((space_dir / RECORD).read_text())
    (space_dir / RECORD).write_text(json.dumps({**record, "tensors_sha256": sha256_bytes(payload)}))
    tensors = bytearray((offer_dir / TENSORS).read_bytes())
    tensors[-1] ^= 0xFF
    (offer_dir / TENSORS).write_bytes(bytes(tensors))

    again = run_retrain(str(config), str(REPO))
    assert not marker.exists()
    assert again.cached_methods == [] and again.outcomes  # recomputed, and the run completed
    for folder in (space_dir, offer_dir):  # and cached again, as data that verifies
        assert json.loads((folder / RECORD).read_text())["tensors_sha256"] == sha256_bytes((folder / TENSORS).read_bytes())

    third = run_retrain(str(config), str(REPO))
    assert third.cached_methods == ["scaling"] and not marker.exists()


def test_a_space_is_asked_for_its_candidates_once_unless_it_searches_per_device(digits, tmp_path):
    """Stitched, scaled and self-distilled spaces offer every device the same candidates: they are built
    (and evaluated) once, not once per device; a space that searches per device is asked per device."""
    from podium.config import AnchorConfig, PodiumConfig, RuntimeConfig, StoreConfig
    from podium.methods.profiling import DeviceProfile
    from podium.tasks.common import RunContext
    from podium.tasks.train import offer_candidates

    space = _stitching(digits)
    asked: list[str | None] = []
    real = space.candidates
    space.candidates = lambda device=None: asked.append(getattr(device, "name", None)) or real(device)
    arch = {"family": "resnet", "layers": [1, 1, 1, 1], "channels": [16, 32, 64, 128]}
    cfg = PodiumConfig(anchors=[AnchorConfig(name="a", arch=arch)], store=StoreConfig(uri=str(tmp_path / "store")),
                       runtime=RuntimeConfig(cache_dir=str(tmp_path / "cache")))
    ctx = RunContext(cfg=cfg, project_dir=str(tmp_path), run_id="r", git_sha="g")
    devices = [DeviceProfile(name=n, latency_budget_ms=10) for n in ("d1", "d2", "d3")]
    offers = offer_candidates.fn(ctx, "stitching", space, devices, "k-once")
    assert asked == [None] and [c.name for c in offers["d3"]] == [c.name for c in offers["d1"]]
    space.searches_per_device = True
    offer_candidates.fn(ctx, "stitching", space, devices, "k-each")
    assert asked == [None, "d1", "d2", "d3"]
