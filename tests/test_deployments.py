"""prefect.yaml stays in step with the flows: every entrypoint imports, and every `parameters:`
block (deployment defaults and schedule overrides) parses into that flow's pydantic model.

Pure: no server. The ops helpers (`know submit` parameter checks) are tested here too.
"""
from __future__ import annotations

import inspect
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "prefect.yaml").read_text())
DEPLOYMENTS = {d["name"]: d for d in CONFIG["deployments"]}

#: fields a deployment deliberately leaves to each run (the UI form marks them required)
REQUIRED_AT_RUN = {"know-predict": {"run_id": "0123456789abcdef"}}


def load_flow(entrypoint: str):
    from flows.ops import load_entrypoint

    return load_entrypoint(entrypoint)


def params_model(flow) -> type[BaseModel]:
    hints = typing.get_type_hints(flow.fn)
    assert list(inspect.signature(flow.fn).parameters) == ["params"], "flows take one flat `params` model"
    model = hints["params"]
    assert issubclass(model, BaseModel)
    return model


def check_params(model: type[BaseModel], block: dict, fill: dict | None = None) -> BaseModel:
    assert set(block) == {"params"}, f"parameters must be {{params: {{...}}}}, got keys {sorted(block)}"
    params = block["params"] or {}
    unknown = set(params) - set(model.model_fields)
    assert not unknown, f"{model.__name__} has no field(s) {sorted(unknown)} (pydantic would drop them silently)"
    return model.model_validate({**(fill or {}), **params})


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_entrypoint_imports_and_parameters_parse(name):
    d = DEPLOYMENTS[name]
    module, func = d["entrypoint"].split(":")
    # module paths, so workers import flows.* as a package (a file path would load it as a
    # top-level module that Dask workers cannot unpickle from)
    assert not module.endswith(".py") and module.startswith("flows."), d["entrypoint"]
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{name}: entrypoint module {module} missing"
    flow = load_flow(d["entrypoint"])
    assert getattr(flow, "name", None), f"{name}: {d['entrypoint']} is not a Prefect flow"
    model = params_model(flow)
    fill = REQUIRED_AT_RUN.get(name, {})
    required = {k for k, f in model.model_fields.items() if f.is_required()}
    assert required - set(d["parameters"]["params"]) <= set(fill), f"{name}: required fields without values"
    check_params(model, d["parameters"], fill)
    for schedule in d.get("schedules") or []:
        if "parameters" in schedule:
            check_params(model, schedule["parameters"], fill)


def test_pools_schedules_and_tags():
    pools = {d["work_pool"]["name"] for d in DEPLOYMENTS.values()}
    assert pools == {"know-cpu", "know-gpu"}
    for d in DEPLOYMENTS.values():
        assert d["tags"][0] == "know" and any(t.startswith("stage-") for t in d["tags"])
        env = d["work_pool"]["job_variables"]["env"]
        assert env["KNOW_REPO"] == "{{ $PWD }}"
        if d["work_pool"]["name"] == "know-gpu":
            assert "CUDA_VISIBLE_DEVICES" in env and d["parameters"]["params"]["device"] == "cuda"
    nightly = DEPLOYMENTS["know-collect"]["schedules"][0]
    assert nightly["active"] is False and nightly["cron"] == "0 2 * * *"
    step = CONFIG["pull"][0]["prefect.deployments.steps.set_working_directory"]
    assert step["directory"] == "{{ $KNOW_REPO }}"
    required = {"know-collect", "know-trajectory", "know-meta-train", "know-predict", "know-pipeline",
                "know-experiment"}
    assert required <= set(DEPLOYMENTS)


def test_trigger_matches_deployment_name_and_role():
    """style.md 5: never match an upstream on its name alone."""
    for d in DEPLOYMENTS.values():
        for trigger in d.get("triggers") or []:
            related = trigger["match_related"]
            specs = related if isinstance(related, list) else [related]
            for spec in specs:
                if "prefect.resource.name" in spec:
                    assert spec.get("prefect.resource.role") == "deployment"
            from prefect.events import DeploymentTriggerTypes
            from pydantic import TypeAdapter

            TypeAdapter(DeploymentTriggerTypes).validate_python(trigger)


def test_stages_table_matches_prefect_yaml():
    from flows.ops import FLOWS, STAGES

    for stage, (deployment, entrypoint) in STAGES.items():
        assert DEPLOYMENTS[deployment]["entrypoint"] == entrypoint, stage
        assert FLOWS[load_flow(entrypoint).name] == entrypoint


def test_submit_parameter_checks():
    from flows.collect import CollectParams
    from flows.ops import OpsError, parse_overrides, validate_params

    params = parse_overrides(["runs=3", "store=s3://bucket/x=y", "epochs-per-stage=2"])
    assert params == {"runs": "3", "store": "s3://bucket/x=y", "epochs_per_stage": "2"}
    checked = validate_params(CollectParams, params)
    assert checked["runs"] == 3 and checked["epochs_per_stage"] == 2
    with pytest.raises(OpsError, match="unknown parameter.*rnus"):
        validate_params(CollectParams, {"rnus": "3"})
    with pytest.raises(OpsError, match="runs"):
        validate_params(CollectParams, {"runs": "three"})
    with pytest.raises(OpsError, match="key=value"):
        parse_overrides(["runs"])


def test_pipeline_stage_params_and_keys():
    from flows.pipeline import PipelineParams, idempotency_key, stage_params

    p = PipelineParams(runs=3, stages=6, limit=300)
    collect, meta, predict = stage_params(p)
    assert (collect.runs, collect.stages, collect.limit) == (3, 6, 300)
    assert meta.exclude_runs == predict.run_id  # the enhanced run never trains KNOWN
    assert predict.known == meta.out == "known"
    again = stage_params(PipelineParams(runs=3, stages=6, limit=300))
    assert idempotency_key("d", again[0]) == idempotency_key("d", collect)
    assert idempotency_key("d", collect) != idempotency_key("d", collect, "token")
    assert idempotency_key("d", collect) != idempotency_key("d", collect.model_copy(update={"runs": 4}))


def test_pipeline_params_are_flat_with_descriptions():
    """style.md 4: the UI form explains itself."""
    from flows.pipeline import PipelineParams

    for name, field in PipelineParams.model_fields.items():
        assert field.description, name
        # flat: a plain type, or a Literal of strings (a string the UI shows as a choice)
        literal = typing.get_origin(field.annotation) is typing.Literal
        assert field.annotation in (str, int, float, bool) or (literal and all(
            isinstance(a, str) for a in typing.get_args(field.annotation))), name
