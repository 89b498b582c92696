"""Bring your own model and checkpoint (issue 12): torchvision, timm and the user's own factory
as the target model, a state_dict file as Θ0, grey images on a 3-channel model, and the
layout / prediction / export / probe chain on those models. Real models, real files, the
real CLI (`know_cli.main`) under the Prefect test harness."""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import flows.trajectory  # noqa: F401 - imported at collection (prefect's log handlers, see test_predict_flow.py)
import know_cli

torchvision = pytest.importorskip("torchvision")

#: the image folder: 3 classes of 32x32 RGB images. 43 training images per class is the least
#: that gives 7 stages at r = 0.5 a last subset (int(129 / 64) = 2) that holds a batch of 2
CLASSES, TRAIN, TEST, SIZE = 3, 43, 8, 32

USER_MODULE = '''
from torch import nn


class TinyNet(nn.Module):
    """A user's model: no forward_features, no `head` attribute; its head is classifier.2."""

    def __init__(self, num_classes=10, width=4, in_channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(4 * width, 8), nn.ReLU(), nn.Linear(8, num_classes))

    def forward(self, x):
        return self.classifier(self.body(x))


def tiny(num_classes=10, width=4, in_channels=3):
    return TinyNet(num_classes, width, in_channels)


NOT_CALLABLE = 3
'''


# --------------------------------------------------------------------------- helpers


def _cli(argv, capfd) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of an in-process `know ...`."""
    capfd.readouterr()
    try:
        know_cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    out, err = capfd.readouterr()
    return code, out, err


def _flow_runs() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.count_flow_runs()


def _one_line_error(argv, capfd, *expected: str) -> str:
    """The command fails before any flow run starts, with exit 2 and one `error:` line."""
    before = _flow_runs()
    code, out, err = _cli(argv, capfd)
    assert code == 2, out[-2000:] + err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], lines[0]
    assert _flow_runs() == before, "the bad input was found inside a flow run, not before it"
    return lines[0]


def _image_folder(root: Path) -> Path:
    """root/{train,test}/<class>/<i>.png: RGB images whose colour depends on the class."""
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN), ("test", TEST)):
        for c in range(CLASSES):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.zeros((SIZE, SIZE, 3)) + [70 * c, 200 - 60 * c, 100]
                img = np.clip(base + rng.normal(0, 30, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return _image_folder(tmp_path_factory.mktemp("byo") / "images")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """byo_user_nets.py in tmp_path, importable for this test only."""
    (tmp_path / "byo_user_nets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "byo_user_nets", raising=False)
    import byo_user_nets

    return byo_user_nets


def _chain(store: Path, folder: Path, model: str, ckpt: Path, out: Path, capfd, *extra: str):
    """trajectory from `ckpt` -> taskvector prediction -> export; returns the run record."""
    from storage.trajectory import TrajectoryStore

    code, _, err = _cli(["trajectory", "--store", store, "--model", model, "--checkpoint", ckpt, "--dataset",
                         "image-folder", "--data-dir", folder, "--stages", "7", "--batch-size", "2", *extra], capfd)
    assert code == 0, err[-3000:]
    ts = TrajectoryStore(store)
    [run] = ts.runs()
    assert run.is_complete and run.n_stages == run.stages_written == 7
    code, _, err = _cli(["predict", "--store", store, "--run-id", run.run_id, "--predictor", "taskvector",
                         "--steps", "1"], capfd)
    assert code == 0, err[-3000:]
    code, _, err = _cli(["export", "--store", store, "--run-id", run.run_id, "--predictor", "taskvector", "--step", "1",
                         "--out", out], capfd)
    assert code == 0, err[-3000:]
    return ts, run


def _check_start(ts, run, ckpt: Path, state: dict) -> None:
    """The run starts from the file: its id carries the sha, stage 0 is the file's weights."""
    from know_core.layout import unflatten_state

    sha = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert run.start == f"file-{sha[:16]}" and run.checkpoint_sha256 == sha and run.spec["checkpoint_sha256"] == sha
    assert run.optimizer == "carry" and run.adam_start == "empty"  # a file holds no Adam moments
    record = ts.checkpoint(run.start)
    assert record.is_complete and record.sha256 == sha and record.adam_step is None
    theta0 = unflatten_state(ts.read_stages(run.run_id, 0), run.layout)
    assert set(theta0) == set(state)
    for k, v in state.items():
        assert torch.equal(theta0[k], v), k


def _exported_logits(model: nn.Module, path: Path, x: torch.Tensor) -> torch.Tensor:
    model.load_state_dict(torch.load(path, weights_only=True), strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    assert torch.isfinite(logits).all()
    return logits


# --------------------------------------------------------------------------- the chains


@pytest.mark.slow  # resnet18's 11M parameters: about 100 s on the loaded 2-core machine
@pytest.mark.usefixtures("prefect_harness")
def test_torchvision_resnet18_from_a_checkpoint_file_to_an_export(folder, tmp_path, capfd):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    ckpt = tmp_path / "ck.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "predicted.pt"
    ts, run = _chain(tmp_path / "runs.zarr", folder, "torchvision:resnet18", ckpt, out, capfd)
    _check_start(ts, run, ckpt, net.state_dict())
    assert run.model_spec == {"name": "torchvision:resnet18", "in_channels": 3, "num_classes": 3, "image_size": 32,
                              "width": None, "kwargs": {}, "head": "", "repeat_channels": False}
    # the layout is resnet18's own state_dict, in its order, with the kinds KNOW needs
    kinds = {s.name: s.kind for s in run.layout}
    assert list(kinds) == list(net.state_dict())
    assert kinds["conv1.weight"] == "conv" and kinds["fc.weight"] == "fc" and kinds["fc.bias"] == "bias"
    assert kinds["bn1.weight"] == "norm" and kinds["bn1.running_var"] == "norm_stat"
    # the trajectory moved and the prediction is not Θ0
    traj = ts.read_stages(run.run_id)
    assert np.isfinite(traj).all() and np.abs(traj[-1] - traj[0]).max() > 0
    logits = _exported_logits(torchvision.models.resnet18(num_classes=3), out, torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 3)
    exported = torch.load(out, weights_only=True)
    assert not torch.equal(exported["conv1.weight"], net.state_dict()["conv1.weight"])


@pytest.mark.usefixtures("prefect_harness")
def test_a_user_model_named_by_import_path_goes_through_the_same_chain(folder, tmp_path, capfd, user_module):
    torch.manual_seed(1)
    net = user_module.tiny(num_classes=3, width=6)
    ckpt = tmp_path / "mine.pt"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "mine-predicted.pt"
    ts, run = _chain(tmp_path / "runs.zarr", folder, "byo_user_nets:tiny", ckpt, out, capfd,
                     "--model-kwargs", '{"width": 6}', "--head", "classifier.2")
    _check_start(ts, run, ckpt, net.state_dict())
    assert run.model_spec["kwargs"] == {"width": 6} and run.model_spec["head"] == "classifier.2"
    assert run.spec["model_kwargs"] == '{"width": 6}'
    _exported_logits(user_module.tiny(num_classes=3, width=6), out, torch.rand(4, 3, 32, 32))

    # the same file again is the same run (the store is the cache); a changed file is another run
    from flows.trajectory import target_specs
    from params.collect import TrajectoryParams

    p = TrajectoryParams(store=str(tmp_path / "runs.zarr"), model="byo_user_nets:tiny", checkpoint=str(ckpt),
                         dataset="image-folder", data_dir=str(folder), stages=7, batch_size=2,
                         model_kwargs='{"width":6}', head="classifier.2")
    assert target_specs(p)[1].run_id == run.run_id
    torch.manual_seed(2)
    torch.save(user_module.tiny(num_classes=3, width=6).state_dict(), ckpt)
    assert target_specs(p)[1].run_id != run.run_id


@pytest.mark.slow  # resnet18's 11M parameters: about 100 s on the loaded 2-core machine
@pytest.mark.usefixtures("prefect_harness")
def test_grey_digits_on_a_three_channel_model_repeat_the_channel(tmp_path, capfd):
    from know_core.models import build_from_spec
    from storage.trajectory import TrajectoryStore

    store = tmp_path / "runs.zarr"
    code, _, err = _cli(["trajectory", "--store", store, "--model", "torchvision:resnet18", "--dataset", "digits",
                         "--limit", "160", "--stages", "3", "--batch-size", "16", "--pretrain-epochs", "1",
                         "--pretrain-batch-size", "80"], capfd)
    assert code == 0, err[-3000:]
    ts = TrajectoryStore(store)
    [run] = ts.runs()
    assert run.is_complete
    assert run.model_spec["repeat_channels"] is True and run.model_spec["in_channels"] == 1
    assert run.adam_start == "checkpoint"  # the project's own pre-training carries its moments
    # the stored weights are resnet18's own (3-channel conv1); the rebuilt model takes grey images
    assert next(s.shape for s in run.layout if s.name == "conv1.weight") == (64, 3, 7, 7)
    model = build_from_spec(run.model_spec_obj())
    out = tmp_path / "theta0.pt"
    code, _, err = _cli(["export", "--store", store, "--run-id", run.run_id, "--out", out], capfd)
    assert code == 0, err[-3000:]
    grey = torch.rand(3, 1, 8, 8)
    logits = _exported_logits(model, out, grey)
    plain = _exported_logits(torchvision.models.resnet18(num_classes=10), out, grey.repeat(1, 3, 1, 1))
    assert torch.allclose(logits, plain)


# --------------------------------------------------------------------------- one-line refusals


@pytest.mark.usefixtures("prefect_harness")
def test_a_checkpoint_that_does_not_fit_names_the_key(folder, tmp_path, capfd, user_module):
    store = tmp_path / "runs.zarr"
    base = ["trajectory", "--store", store, "--dataset", "image-folder", "--data-dir", folder, "--stages", "7",
            "--batch-size", "2"]
    wrong_classes = tmp_path / "five.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), wrong_classes)
    _one_line_error([*base, "--model", "torchvision:resnet18", "--checkpoint", wrong_classes], capfd,
                    "'fc.weight'", "(5, 512)", "(3, 512)", "3 classes")
    state = user_module.tiny(num_classes=3).state_dict()
    del state["body.1.running_var"]
    missing = tmp_path / "missing.pt"
    torch.save(state, missing)
    _one_line_error([*base, "--model", "byo_user_nets:tiny", "--checkpoint", missing], capfd,
                    "'body.1.running_var'", "missing", "(4,)")
    extra = tmp_path / "extra.pt"
    torch.save({**user_module.tiny(num_classes=3).state_dict(), "aux.weight": torch.zeros(2)}, extra)
    _one_line_error([*base, "--model", "byo_user_nets:tiny", "--checkpoint", extra], capfd, "'aux.weight'")
    pickled = tmp_path / "model.pt"
    torch.save(user_module.tiny(num_classes=3), pickled)  # the whole module, not a state_dict: needs code to load
    _one_line_error([*base, "--model", "byo_user_nets:tiny", "--checkpoint", pickled], capfd, "weights_only=True")
    _one_line_error([*base, "--checkpoint", tmp_path / "nowhere.pt"], capfd, "--checkpoint", "no such file")
    assert not store.exists() or _run_ids(store) == []


def _run_ids(store: Path) -> list:
    from storage.trajectory import TrajectoryStore

    return TrajectoryStore(store).run_ids()


@pytest.mark.usefixtures("prefect_harness")
def test_model_names_kwargs_and_heads_are_checked_in_one_line(folder, tmp_path, capfd, user_module):
    base = ["trajectory", "--store", tmp_path / "runs.zarr", "--dataset", "image-folder", "--data-dir", folder,
            "--stages", "7", "--batch-size", "2"]
    cases = [
        (["--model", "torchvision:resnet99"], ("torchvision has no model 'resnet99'",)),
        (["--model", "no_such_package.nets:build"], ("'no_such_package.nets' cannot be imported",)),
        (["--model", "byo_user_nets:missing"], ("has no attribute 'missing'",)),
        (["--model", "byo_user_nets:NOT_CALLABLE"], ("not a callable",)),
        (["--model", "vgg99"], ("unknown model 'vgg99'", "torchvision:<name>")),
        (["--model", "byo_user_nets:tiny", "--model-kwargs", "[1, 2]"], ("--model-kwargs", "JSON object")),
        (["--model", "byo_user_nets:tiny", "--model-kwargs", "{width: 2}"], ("--model-kwargs", "not JSON")),
        (["--model", "byo_user_nets:tiny", "--model-kwargs", '{"depth": 2}'], ("cannot be built", "depth")),
        (["--model", "byo_user_nets:tiny", "--head", "classifier.9"], ("'classifier.9'", "no such module")),
        (["--model", "byo_user_nets:tiny", "--head", "body.0"], ("Conv2d, not an nn.Linear",)),
        (["--model", "byo_user_nets:tiny", "--model-kwargs", '{"in_channels": 2}'], ("2-channel", "3 channels")),
    ]
    for args, expected in cases:
        _one_line_error([*base, *args], capfd, *expected)


@pytest.mark.usefixtures("prefect_harness")
def test_timm_models_need_timm(tmp_path, capfd):
    if importlib.util.find_spec("timm") is None:
        _one_line_error(["trajectory", "--store", tmp_path / "runs.zarr", "--model", "timm:resnet18"], capfd,
                        "pip install timm")
    else:  # timm is there: its models build like any other
        from know_core.models import build_model

        assert build_model("timm:resnet18", 3, 4, 32)(torch.rand(2, 3, 32, 32)).shape == (2, 4)


# --------------------------------------------------------------------------- pieces


def test_layout_prediction_and_export_pieces_work_on_torchvision_models():
    from know_core.layout import flatten_state, param_layout, unflatten_state
    from know_core.models import build_seeded, find_head, spec_for_data

    for name, head in (("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")):
        spec = spec_for_data(f"torchvision:{name}", 3, 7, 32)
        model, twin = build_seeded(spec, 0), build_seeded(spec, 0)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))  # seeded
        assert find_head(model)[0] == head and model.know_head == head
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 7)  # the head was replaced to the data's classes
        layout = param_layout(model)
        state = model.state_dict()
        back = unflatten_state(flatten_state(state, layout), layout)
        assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    # grey images on a 3-channel model: a pre-hook repeats the channel; the state_dict is resnet18's own
    grey = spec_for_data("torchvision:resnet18", 1, 3, 8)
    assert grey.repeat_channels and grey.in_channels == 1
    model = build_seeded(grey, 0).eval()
    plain = torchvision.models.resnet18(num_classes=3).eval()
    plain.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x.repeat(1, 3, 1, 1)))


def test_linear_probe_and_finetune_on_a_torchvision_model():
    from know_core.evaluate import FinetuneConfig, finetune, replace_head
    from know_core.models import head_inputs
    from know_core.probe import linear_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.rand(60, 3, 16, 16, generator=g) * 0.5 + y[:, None, None, None] * 0.25
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    assert not hasattr(model, "forward_features")
    model.eval()
    with head_inputs(model) as grab:
        model(x[:4])
        assert grab().shape == (4, 512)
    result = linear_probe(model, (x[:45], y[:45]), (x[45:], y[45:]), max_iter=50)
    assert 0.0 <= result["acc"] <= 1.0 and np.isfinite(result["loss"])
    assert result["acc"] > 0.5  # the colour offset is linearly separable in the random features
    a, b = replace_head(copy_of(model), 5, seed=3), replace_head(copy_of(model), 5, seed=3)
    assert a.fc.out_features == 5 and torch.equal(a.fc.weight, b.fc.weight)
    assert torch.equal(a.layer1[0].conv1.weight, model.layer1[0].conv1.weight)  # nothing else changed
    rows = finetune(copy_of(model), 2, (x[:40], y[:40] % 2), (x[40:], y[40:] % 2),
                    FinetuneConfig(phase1_epochs=1, phase2_epochs=1, batch_size=20))
    assert len(rows) == 2 and all(np.isfinite(r["train_loss"]) for r in rows)


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_safetensors_files_and_canonical_kwargs(tmp_path, user_module):
    from params.collect import TrajectoryParams
    from tasks.checkpoint import read_state_dict

    state = user_module.tiny(num_classes=3).state_dict()
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors.torch import save_file

        save_file(state, tmp_path / "ck.safetensors")
        back = read_state_dict(tmp_path / "ck.safetensors")
        assert set(back) == set(state) and all(torch.equal(back[k], v) for k, v in state.items())
    torch.save({"state_dict": state}, tmp_path / "wrapped.pt")  # the common {"state_dict": ...} wrapper
    assert set(read_state_dict(tmp_path / "wrapped.pt")) == set(state)
    # equal kwargs, equal run ids: the JSON is stored canonical
    a = TrajectoryParams(model="byo_user_nets:tiny", model_kwargs='{"width": 6, "in_channels": 3}')
    b = TrajectoryParams(model="byo_user_nets:tiny", model_kwargs='{ "in_channels":3,"width":6 }')
    assert a.model_kwargs == b.model_kwargs == '{"in_channels": 3, "width": 6}'
    assert TrajectoryParams(model_kwargs="{}").model_kwargs == ""


def test_records_and_ids_from_before_stay_valid():
    """Run and checkpoint ids of specs without the new fields are what they always were, and a
    stored model_spec without kwargs/head/repeat_channels still loads."""
    from storage.records import RunRecord
    from storage.trajectory import config_hash
    from tasks.collect import PretrainSpec
    from tasks.specs import RunSpec

    old_run = dict(dataset="digits", data_dir="", classes="0-4", limit=0, model="resnet", width=8, r=0.5, stages=7,
                   lr=1e-3, batch_size=8, epochs_per_stage=1, seed=0, mode="sequential", optimizer="carry",
                   augment=False, start="pre-abc")
    assert RunSpec(**old_run).run_id == config_hash(old_run)
    old_pre = dict(dataset="digits", data_dir="", classes="0-4", limit=0, model="resnet", width=8, epochs=1, lr=1e-3,
                   batch_size=32, seed=0, augment=False)
    assert PretrainSpec(**old_pre).checkpoint_id == "pre-" + config_hash(old_pre)
    assert RunSpec(**old_run, head="head").run_id != config_hash(old_run)
    record = RunRecord.model_validate({"run_id": "x", "status": "complete", "n_stages": 2, "model_spec": {
        "name": "resnet", "in_channels": 1, "num_classes": 5, "image_size": 8, "width": 4}})
    spec = record.model_spec_obj()
    assert (spec.kwargs, spec.head, spec.repeat_channels) == ({}, "", False)
    from know_core.models import build_from_spec

    assert json.dumps(spec.to_dict()) and build_from_spec(spec)(torch.rand(2, 1, 8, 8)).shape == (2, 5)
