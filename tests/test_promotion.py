"""Champion/challenger promotion, rollback and the early end of unchanged scheduled runs, through
the real flow (SQLite MLflow, moto S3, Prefect test harness).

Configs use one tiny anchor and no methods so each flow run takes seconds; a different anchor seed
gives a new winner (a new digest), and the test edits the champion's ``val_acc`` tag to decide who
wins."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from podium.flows.retrain import retrain, run_retrain
from podium.registry.mlflow_registry import ModelRegistry
from podium.registry.release import read_current
from podium.registry.stores import open_store
from tests.flow_helpers import BUCKET, REPO, one_anchor_config

pytestmark = pytest.mark.integration
MODEL, DEVICE = "digits-classifier", "cpu-1t"
PREFIX = f"s3://{BUCKET}/promotion"  # apart from the other integration module's releases


def config(services, name: str, seed: int) -> Path:
    return one_anchor_config(services, services["root"] / f"{name}.yaml", seed, PREFIX, DEVICE)


def registry(services) -> ModelRegistry:
    return ModelRegistry(f"sqlite:///{services['root']}/mlflow.db")


def champion(services):
    return registry(services).version_by_alias(MODEL, DEVICE)


def current(services) -> dict | None:
    return read_current(open_store(PREFIX, services["endpoint"]), MODEL, DEVICE)


@pytest.fixture(scope="module")
def first(prefect_harness, services):  # noqa: F811
    cfg = config(services, "seed0", seed=0)
    return run_retrain(str(cfg), str(REPO)), cfg


def test_first_winner_is_promoted_with_its_reason(first, services):
    result, _ = first
    (outcome,) = result.outcomes
    assert outcome.alias_moved and not result.skipped
    version = champion(services)
    assert str(version.version) == str(outcome.version)
    assert version.tags["promotion"] == "promoted" and version.tags["promotion_reason"] == "no champion yet"
    assert str(current(services)["version"]) == str(version.version)
    runs = registry(services).client.get_run(result.run_id)
    assert runs.data.tags["completed"] == "true" and runs.data.tags["config_digest"]
    assert not open_store(PREFIX, services["endpoint"]).exists(f"{MODEL}/_locks/promote.json")  # lock released
    assert "podium.intent.cpu-1t" not in registry(services).model_tags(MODEL)  # the two-phase move finished


def test_unchanged_scheduled_run_ends_early_and_trains_nothing(first, services):
    result, cfg = first
    before = registry(services).search_versions(MODEL)
    again = run_retrain(str(cfg), str(REPO), skip_if_unchanged=True)
    assert again.skipped and again.outcomes == [] and again.cached_methods == []
    assert again.data_hash == result.data_hash and "unchanged" in again.report
    run = registry(services).client.get_run(again.run_id)
    assert run.data.tags["skipped"] == "unchanged" and run.data.tags["skipped_baseline"] == result.run_id
    assert "completed" not in run.data.tags and run.info.status == "FINISHED"
    assert len(registry(services).search_versions(MODEL)) == len(before)  # nothing registered


def test_losing_challenger_keeps_alias_and_current_release(first, services):
    reg = registry(services)
    held = champion(services)
    reg.set_version_tags(MODEL, held.version, {"val_acc": "1.0"})  # no challenger can beat 1.0
    store_before = current(services)
    # a changed config is not skipped even when asked to skip unchanged runs
    result = run_retrain(str(config(services, "seed1", seed=1)), str(REPO), skip_if_unchanged=True)
    (outcome,) = result.outcomes
    assert not result.skipped and str(outcome.version) != str(held.version) and not outcome.alias_moved
    assert str(champion(services).version) == str(held.version)
    assert current(services) == store_before
    loser = reg.get_version(MODEL, outcome.version)
    assert loser.tags["promotion"] == "kept-champion"
    assert loser.tags["promotion_reason"].startswith(f"champion v{held.version} kept: 1.0000 >= challenger")


def test_winning_challenger_then_rollback(first, services):
    from podium.cli import app

    reg = registry(services)
    held = champion(services)
    reg.set_version_tags(MODEL, held.version, {"val_acc": "0.0"})  # any challenger wins
    cfg = config(services, "seed2", seed=2)
    (outcome,) = run_retrain(str(cfg), str(REPO)).outcomes
    assert outcome.alias_moved and str(champion(services).version) == str(outcome.version)
    new = reg.get_version(MODEL, outcome.version)
    assert new.tags["promotion"] == "promoted" and new.tags["previous_version"] == str(held.version)
    assert new.tags["promotion_reason"].startswith("challenger") and f"champion v{held.version}" in new.tags["promotion_reason"]
    assert str(current(services)["version"]) == str(outcome.version)

    out = CliRunner().invoke(app, ["rollback", "--model", MODEL, "--device", DEVICE, "--config", str(cfg)])
    assert out.exit_code == 0, out.output
    assert str(champion(services).version) == str(held.version)
    assert str(current(services)["version"]) == str(held.version)
    assert reg.get_version(MODEL, outcome.version).tags["promotion"] == "rolled-back"


def test_prefect_yaml_declares_the_scheduled_retrain():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    assert spec["pull"][0]["prefect.deployments.steps.set_working_directory"]["directory"]
    flow = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert flow.name == retrain.name
    assert deployment["parameters"]["skip_if_unchanged"] is True
    flow.validate_parameters(deployment["parameters"])  # every parameter is one the flow takes
    for schedule in deployment["schedules"]:
        CronSchedule(cron=schedule["cron"])
    assert deployment["work_pool"]["name"]
