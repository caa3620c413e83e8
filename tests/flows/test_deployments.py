"""Deployments: registered with the Prefect API, scheduled, and without the secret."""

from __future__ import annotations

from pathlib import Path

from flows.config import parse_config
from flows.deployments import build_deployments, deployment_parameters, register_deployments


def test_parameters_leave_the_token_out() -> None:
    config = parse_config({"root": "/data", "label_studio": {"token": "very-secret"}})
    params = deployment_parameters(config)
    assert "token" not in params["config"]["label_studio"]
    assert "very-secret" not in repr(params)
    # What a flow run receives validates back into the same config, token aside.
    again = parse_config(params["config"])
    assert again.model_dump(exclude={"label_studio": {"token"}}) == config.model_dump(
        exclude={"label_studio": {"token"}}
    )


def test_deploy_registers_four_flows_with_a_cron_schedule(
    prefect_harness: None, tmp_path: Path
) -> None:
    from prefect import get_client

    config = parse_config({"root": str(tmp_path), "label_studio": {"token": "very-secret"}})
    ids = register_deployments(build_deployments(config, name="nightly", cron="0 3 * * *"))
    assert len(ids) == 4
    with get_client(sync_client=True) as client:
        read = [client.read_deployment(i) for i in ids]
        flows = {client.read_flow(d.flow_id).name: d for d in read}
    assert set(flows) == {
        "data-engine",
        "stage1-assisted-manual",
        "stage2-semi-automatic",
        "stage3-fully-automatic",
    }
    engine = flows["data-engine"]
    assert engine.name == "nightly"
    assert [s.schedule.cron for s in engine.schedules] == ["0 3 * * *"]
    assert not flows["stage2-semi-automatic"].schedules
    for deployment in flows.values():
        assert deployment.parameters["config"]["root"] == str(tmp_path)
        assert "very-secret" not in repr(deployment.parameters)
