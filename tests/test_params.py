"""One source of truth: every setting is a field of its stage model (params/), and the CLI,
`know submit --param` and the core arithmetic all follow from it."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

import know_cli  # noqa: F401 - sets the Prefect environment before flows are imported
from cli.commands import app
from params import COMMANDS, CollectParams, ExperimentParams, PipelineParams, describe, option


def _cli_arguments(command: str):
    return [a for a in app[command].assemble_argument_collection() if a.keys]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_cli_option_is_a_field_of_the_commands_model_with_its_default(command):
    model = COMMANDS[command]
    args = _cli_arguments(command)
    seen = set()
    for arg in args:
        field = arg.keys[-1]
        assert field in model.model_fields, f"know {command} {arg.name}: no field {field!r} in {model.__name__}"
        assert option(field) in arg.names, (arg.names, field)
        info = model.model_fields[field]
        default = info.get_default(call_default_factory=True)
        if info.is_required():
            assert arg.required, field
        else:
            assert arg.field_info.default == default, (command, field, arg.field_info.default, default)
        seen.add(field)
    assert seen == set(model.model_fields), f"fields without a CLI option: {set(model.model_fields) - seen}"


def test_cli_help_shows_the_models_descriptions(capsys):
    for command, model in COMMANDS.items():
        with pytest.raises(SystemExit) as exc:
            know_cli.main([command, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        for name, field in model.model_fields.items():
            assert option(name) in out, (command, name)
            assert field.description and field.description.split()[0] in out, (command, name)


def test_r_is_a_real_field_that_fixes_both_ends_of_the_sweep():
    p = CollectParams(r=0.4, lr=2e-3, batch_size=16)
    assert p.r_bounds() == (0.4, 0.4) and p.r_grid() == [0.4]
    assert p.lr_bounds() == (2e-3, 2e-3) and p.lr_grid() == [2e-3]
    assert p.batch_bounds() == (16, 16) and p.grid_batch() == 16
    assert CollectParams().r_bounds() == (0.3, 0.9)  # 0 leaves r to the sweep


def test_submit_param_accepts_every_field_of_the_collect_model():
    from flows.ops import parse_overrides, validate_params

    assert validate_params(CollectParams, parse_overrides(["r=0.5"]))["r"] == 0.5
    for name, field in CollectParams.model_fields.items():
        value = field.get_default(call_default_factory=True)
        text = str(value).lower() if isinstance(value, bool) else str(value)
        assert validate_params(CollectParams, parse_overrides([f"{name}={text}"]))[name] == value, name


def test_submit_param_errors_name_the_field():
    from flows.ops import OpsError, parse_overrides, validate_params

    with pytest.raises(OpsError, match=r"parameter r 1.5: must be less than 1"):
        validate_params(CollectParams, parse_overrides(["r=1.5"]))
    with pytest.raises(OpsError, match="unknown parameter"):
        validate_params(CollectParams, parse_overrides(["rr=0.5"]))


def test_pipeline_is_the_collect_model_plus_its_own_fields():
    assert set(CollectParams.model_fields) <= set(PipelineParams.model_fields)
    assert PipelineParams(runs=3, r=0.5).collect_params() == CollectParams(runs=3, r=0.5)


@pytest.mark.parametrize("r, factor, ok", [(0.5, 8, 3), (1 / 3, 9, 2), (1 / 3, 8, None), (0.5, 3, None), (0.5, 1.5, None)])
def test_factors_must_be_powers_of_one_over_r(r, factor, ok):
    from know_core.errors import BadInput
    from know_core.predict import step_for_factor

    if ok is None:
        with pytest.raises(BadInput, match="is not a power of 1/r"):
            step_for_factor(factor, r)
        with pytest.raises(ValidationError, match="is not a power of 1/r"):
            ExperimentParams(r=r, methods=f"naive,know:{factor:g}")
    else:
        assert step_for_factor(factor, r) == ok
        assert ExperimentParams(r=r, methods=f"know:{factor:g}").step_of(factor) == ok


def test_presets_fill_what_is_not_given_and_explicit_values_win():
    quick = ExperimentParams(preset="quick")
    assert (quick.source_dataset, quick.seeds, quick.out) == ("digits", 2, "results/quick")
    assert ExperimentParams(preset="quick", seeds=4, out="x").model_dump(include={"seeds", "out"}) == {"seeds": 4, "out": "x"}
    # what a deployment or `know submit` sends is a dict: the preset applies the same way
    assert ExperimentParams.model_validate({"preset": "quick"}) == quick


def test_describe_names_the_option_or_the_field():
    with pytest.raises(ValidationError) as err:
        CollectParams(stages=1)
    assert describe(err.value) == "--stages 1: must be at least 2"
    assert describe(err.value, cli=False) == "stages 1: must be at least 2"
    with pytest.raises(ValidationError) as err:
        CollectParams(r_min=0.8, r_max=0.5)
    assert "--r-min 0.8 is above --r-max 0.5" in describe(err.value)


# ------------------------------------------------- issue 11: own shrink controls, tuned rows, exact factors
def test_every_predictor_gets_its_own_shrink_control_at_each_of_its_factors():
    from params.experiment import ExperimentParams

    p = ExperimentParams(official_dir="/x", methods="naive,know:2,know:8,official:8,taskvector:2,logfit:4")
    rows = p.method_factors()
    for pred, f in [("know", 2.0), ("know", 8.0), ("official", 8.0), ("taskvector", 2.0), ("logfit", 4.0)]:
        control = "shrink" if pred == "know" else f"shrink-{pred}"
        assert (control, f) in rows, (control, f)
    assert ("shrink", 4.0) not in rows  # no know row at ×4
    assert len(rows) == len(set(rows))
    off = ExperimentParams(official_dir="/x", methods="know:2", shrink_controls=False).method_factors()
    assert off == [("know", 2.0)]


def test_tuned_rows_tune_the_listed_starts_of_their_source():
    from params.experiment import ExperimentParams

    p = ExperimentParams(official_dir="/x", methods="naive,naive-lr,know:2,know:8,know-lr,official:8,official-lr")
    assert p.tuned_rows() == {"naive-lr": [("naive", 1.0)], "know-lr": [("know", 2.0), ("know", 8.0)],
                              "official-lr": [("official", 8.0)]}
    assert all(m not in ("naive-lr", "know-lr", "official-lr") for m, _ in p.method_factors())
    # without official_dir the official rows, tuned or not, are left out
    assert set(ExperimentParams(methods="know:2,know-lr,official:8,official-lr").tuned_rows()) == {"know-lr"}


@pytest.mark.parametrize("methods, needle", [
    ("know-lr", "tunes the know rows, but methods lists none"),
    ("know:2,know-lr:2", "takes no factor"),
    ("know", "needs a factor above 1"),
    ("shrink-logfit", "needs a factor above 1"),
    ("naive:2", "takes no factor"),
    ("shrink-bogus:2", "unknown method"),
])
def test_bad_methods_lists_are_one_line_errors(methods, needle):
    from params.common import describe
    from params.experiment import ExperimentParams

    with pytest.raises(ValidationError) as err:
        ExperimentParams(methods=methods)
    line = describe(err.value)
    assert needle in line and "\n" not in line


def test_r_one_third_labels_and_steps_come_from_r():
    from params.experiment import ExperimentParams

    p = ExperimentParams(r=1 / 3, methods="naive,know:9,know:3")
    assert p.step_of(9.0) == 2 and p.step_of(3.0) == 1
    assert ("know", 9.0) in p.method_factors() and ("shrink", 9.0) in p.method_factors()
    with pytest.raises(ValidationError, match="power"):
        ExperimentParams(r=1 / 3, methods="naive,know:8")


def test_a_run_checkpoint_reaches_the_target_trajectory(tmp_path):
    from flows.experiment import plan

    ck = tmp_path / "ck.pt"
    ck.write_bytes(b"x")
    assert plan(ExperimentParams(checkpoint=str(ck))).target.checkpoint == str(ck)
    with pytest.raises(ValidationError):
        plan(ExperimentParams(checkpoint=str(tmp_path / "missing.pt")))
