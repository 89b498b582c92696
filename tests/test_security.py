"""Nothing in the product unpickles untrusted bytes.

Every load site gets a file that would run code under plain pickle.load / torch.load:
its __reduce__ names a callable that creates a marker file. The real loader must raise a
one-line ValueError (UnsafeFileError) naming the file, and the marker must not exist.
A source scan keeps new unsafe load calls out of the product code.

    CIFAR python batches     know_core.data.load_cifar / load_dataset (RestrictedUnpickler)
    KNOWN model file         storage.known_files.load_known_payload (known.pt)
    meta-train checkpoint    storage.known_files.load_state (ckpt-<kind>.pt, tasks/meta.py)
"""
from __future__ import annotations

import ast
import codecs
import io
import os
import pathlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from know_core.data import RestrictedUnpickler, UnsafeFileError, load_cifar, load_dataset, read_cifar_batch
from storage.known_files import known_path, load_known_payload, load_state, save_known, save_state

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ malicious payloads


class RunsShell:
    """Unpickling this runs `touch <marker>` through os.system (posix.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class TouchesFile:
    """Unpickling this calls pathlib.Path.touch(marker) (no shell)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


PAYLOADS = [RunsShell, TouchesFile]


def _assert_refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> str:
    msg = str(err.value)
    assert isinstance(err.value, UnsafeFileError) and isinstance(err.value, ValueError)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert not marker.exists(), "the malicious payload ran"
    return msg


def _direct_pickle_is_dangerous(obj, marker: Path) -> None:
    """Control: the payload really does create the marker under plain pickle (then clean up)."""
    pickle.loads(pickle.dumps(obj))
    assert marker.exists(), "the control payload should have created the marker"
    marker.unlink()


# --------------------------------------------------------------------------------- CIFAR


def _batch(n: int, label_key: bytes, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8),
            label_key: rng.integers(0, 10, size=n).tolist(), b"batch_label": b"training batch 1 of 5",
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


class _Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote for CIFAR: str as BINSTRING, numpy.core names."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_str(self, obj):  # a python 2 str is bytes
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, 2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5, "py2"])
def test_genuine_cifar_batches_still_load(tmp_path, protocol):
    batches = [_batch(3, b"labels", seed) for seed in range(2)]
    batches[1][b"labels"] = np.asarray(batches[1][b"labels"], dtype=np.int64)  # an array of labels
    batches[1][b"extra_scalar"] = np.int64(7)  # numpy scalars rebuild too
    batches[1][b"strided"] = np.arange(24).reshape(4, 6)[:, ::2]  # non-contiguous: the other reduce path
    for i, b in enumerate(batches, 1):
        raw = _py2_dumps(b) if protocol == "py2" else pickle.dumps(b, protocol=protocol)
        (tmp_path / f"data_batch_{i}").write_bytes(raw)
    if protocol == "py2":
        assert b"numpy.core.multiarray\n_reconstruct" in (tmp_path / "data_batch_1").read_bytes()
    ds = load_cifar(tmp_path, "train", 10)
    expect = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).astype(np.float32) / 255
    torch.testing.assert_close(ds.x, torch.from_numpy(expect))
    assert ds.y.tolist() == batches[0][b"labels"] + list(batches[1][b"labels"])
    back = read_cifar_batch(tmp_path / "data_batch_2")
    assert back[b"extra_scalar"] == 7 and back[b"filenames"][0] == b"img_0.png"
    assert np.array_equal(back[b"strided"], batches[1][b"strided"])


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_cifar10_batch_is_refused(tmp_path, payload, protocol):
    marker = tmp_path / "pwned"
    _direct_pickle_is_dangerous(payload(marker), marker)
    data = tmp_path / "cifar"
    data.mkdir()
    (data / "data_batch_1").write_bytes(pickle.dumps(_batch(2, b"labels"), protocol=protocol))
    evil = {**_batch(2, b"labels"), b"labels": payload(marker)}  # the payload after genuine arrays
    (data / "data_batch_2").write_bytes(pickle.dumps(evil, protocol=protocol))
    with pytest.raises(UnsafeFileError) as err:
        load_cifar(data, "train", 10)
    msg = _assert_refused(err, data / "data_batch_2", marker)
    assert "refusing to unpickle '" in msg and "not a CIFAR python batch" in msg
    if payload is RunsShell:
        assert f"'{os.system.__module__}.system'" in msg, msg  # posix.system


@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_cifar_test_batch_and_cifar100_are_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    (tmp_path / "test_batch").write_bytes(pickle.dumps(payload(marker)))
    with pytest.raises(UnsafeFileError) as err:
        load_dataset("cifar10", "test", data_dir=str(tmp_path))
    _assert_refused(err, tmp_path / "test_batch", marker)

    (tmp_path / "train").write_bytes(pickle.dumps({b"data": payload(marker), b"fine_labels": [1]}, protocol=2))
    with pytest.raises(UnsafeFileError) as err:
        load_dataset("cifar100", "train", data_dir=str(tmp_path))
    _assert_refused(err, tmp_path / "train", marker)


def test_restricted_unpickler_allows_latin1_codecs_only(tmp_path):
    """Protocol 2 writes bytes as _codecs.encode(text, 'latin1'); nothing else goes through it."""

    class OtherCodec:
        def __reduce__(self):
            return codecs.encode, ("payload", "rot13")

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": OtherCodec()}, protocol=2))
    assert b"_codecs\nencode" in path.read_bytes()
    with pytest.raises(UnsafeFileError, match="refusing to unpickle '_codecs.encode' with 'rot13'"):
        read_cifar_batch(path)
    # and the allow-list is the allow-list: builtins are refused too
    for bad in (eval, getattr, __import__, pathlib.Path, np.load):
        with pytest.raises(UnsafeFileError, match="refusing to unpickle"):
            RestrictedUnpickler(io.BytesIO(pickle.dumps(bad)), path).load()


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", "truncated", "list"])
def test_corrupt_cifar_batch_is_one_line(tmp_path, content):
    path = tmp_path / "test_batch"
    if content == "truncated":
        content = pickle.dumps(_batch(2, b"labels"))[:-200]
    elif content == "list":
        content = pickle.dumps([1, 2, 3])
    path.write_bytes(content)
    with pytest.raises(UnsafeFileError) as err:
        load_cifar(tmp_path, "test", 10)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "CIFAR" in msg, msg


def test_cifar_batch_without_its_label_key(tmp_path):
    (tmp_path / "test_batch").write_bytes(pickle.dumps(_batch(2, b"fine_labels")))
    with pytest.raises(UnsafeFileError, match="no b'labels' key"):
        load_cifar(tmp_path, "test", 10)


# ------------------------------------------------------------------- torch files


def _torch_save_malicious(path: Path, payload, marker: Path) -> None:
    """A torch.save file whose pickle holds the payload (torch.save pickles whatever it is given)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"models": {"conv": {"w": torch.zeros(2)}}, "evil": payload(marker), "format": 1}, path)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_torch_weights_only_refuses_the_payload(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "x.pt"
    _torch_save_malicious(path, payload, marker)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_known_file_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    known_dir = tmp_path / "known" / "all" / "raw"
    _torch_save_malicious(known_path(known_dir), payload, marker)
    with pytest.raises(UnsafeFileError) as err:
        load_known_payload(known_dir)
    msg = _assert_refused(err, known_path(known_dir), marker)
    assert "refusing to load" in msg and "known.pt" in msg, msg


@pytest.mark.parametrize("payload", PAYLOADS)
def test_malicious_meta_train_checkpoint_is_refused(tmp_path, payload):
    """A planted <out>/<meta_data>/<scaling>/ckpt-conv.pt: the resume step (tasks/meta.py) refuses it."""
    import tasks.meta
    from tasks.common import NOT_RETRYABLE

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "out" / "all" / "raw" / "ckpt-conv.pt"
    _torch_save_malicious(ckpt, payload, marker)
    assert tasks.meta.load_state is load_state  # the task resumes through this loader
    with pytest.raises(UnsafeFileError) as err:
        load_state(ckpt)
    msg = _assert_refused(err, ckpt, marker)
    assert "meta-training checkpoint" in msg, msg
    assert issubclass(UnsafeFileError, NOT_RETRYABLE)  # the task fails once, not after a retry


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated", "plain pickle"])
def test_corrupt_torch_files_are_one_line(tmp_path, damage):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.arange(100.0)}, good)
    raw = {"empty": b"", "garbage": b"garbage" * 20, "truncated": good.read_bytes()[:-40],
           "plain pickle": pickle.dumps({"w": 1})}[damage]
    known_dir = tmp_path / "known"
    known_dir.mkdir()
    known_path(known_dir).write_bytes(raw)
    ckpt = tmp_path / "ckpt-fc.pt"
    ckpt.write_bytes(raw)
    for load, path in ((lambda: load_known_payload(known_dir), known_path(known_dir)), (lambda: load_state(ckpt), ckpt)):
        with pytest.raises(UnsafeFileError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and str(path) in msg, msg


def test_missing_files_keep_their_meaning(tmp_path):
    assert load_state(tmp_path / "ckpt-conv.pt") is None
    with pytest.raises(FileNotFoundError, match="meta-train"):
        load_known_payload(tmp_path)


def test_meta_train_state_round_trips_with_weights_only(tmp_path):
    """What tasks/meta.py saves (train_known's on_epoch state + input_hash) loads and resumes."""
    from know_core.meta import MetaConfig, train_known

    rng = np.random.default_rng(0)
    X = rng.normal(size=(256, 5)).astype(np.float32)
    Y = (0.9 * X[:, -1]).astype(np.float32)
    cfg = MetaConfig(epochs=2, batch_size=128, patience=5)
    ckpt = tmp_path / "out" / "all" / "raw" / "ckpt-conv.pt"
    saved = []

    def on_epoch(row, state):
        save_state(ckpt, {**state, "input_hash": "abc123"})
        saved.append(row["epoch"])

    full, _ = train_known(X[:192], Y[:192], X[192:], Y[192:], cfg, on_epoch=on_epoch)
    assert saved == [1, 2]
    state = load_state(ckpt)  # weights_only=True
    assert state["input_hash"] == "abc123" and state["epoch"] == 2
    resumed, hist = train_known(X[:192], Y[:192], X[192:], Y[192:], cfg,
                                resume_state={k: v for k, v in state.items() if k != "input_hash"})
    assert len(hist) == 2
    assert all(torch.equal(full.state_dict()[k], v) for k, v in resumed.state_dict().items())


def test_known_payload_round_trips_with_weights_only(tmp_path):
    payload = {"format": 1, "models": {"conv": {"w": torch.ones(3)}}, "scaling": "raw",
               "provenance": {"input_hash": "h", "train_runs": ["a"], "history": "{}"}}
    save_known(tmp_path, payload)
    back = load_known_payload(tmp_path)
    assert back["provenance"] == payload["provenance"] and torch.equal(back["models"]["conv"]["w"], torch.ones(3))


# ------------------------------------------------------------------------- source scan

MARKER = "# restricted unpickler: see RestrictedUnpickler"
PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}
PICKLE_READERS = {"load", "loads", "Unpickler", "open", "read_pickle"}


def _product_files() -> list[Path]:
    files = sorted(ROOT.glob("*.py"))
    for folder in ("know_core", "storage", "tasks", "flows", "scripts", "benchmarks"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if ".venv" not in f.parts]


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _unsafe_loads(source: str) -> list[tuple[int, str]]:
    """(line, why) for every call that would unpickle untrusted bytes."""
    lines = source.splitlines()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            names = [a.name for a in node.names if a.name in PICKLE_READERS or a.name == "*"]
            if names:
                found.append((node.lineno, f"imports {names} from {node.module}"))
        if isinstance(node, ast.ImportFrom) and node.module == "torch" and any(a.name == "load" for a in node.names):
            found.append((node.lineno, "imports torch.load by name (use torch.load(..., weights_only=True))"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        line = lines[node.lineno - 1]
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in PICKLE_MODULES and parts[-1] in PICKLE_READERS:
            found.append((node.lineno, f"{name}(...)"))
        elif parts[-1] in ("read_pickle",):
            found.append((node.lineno, f"{name}(...)"))
        elif parts[-1].endswith("Unpickler") and MARKER not in line:
            found.append((node.lineno, f"{name}(...) without the restricted-unpickler marker"))
        if name.endswith("torch.load") or name == "torch.load":
            w = kw.get("weights_only")
            if not (isinstance(w, ast.Constant) and w.value is True):
                found.append((node.lineno, "torch.load without weights_only=True"))
        for key, bad in (("weights_only", False), ("allow_pickle", True)):
            v = kw.get(key)
            if v is not None and not (isinstance(v, ast.Constant) and v.value is (not bad)):
                found.append((node.lineno, f"{key}={ast.unparse(v)}"))
    for i, line in enumerate(lines, 1):  # the marker vouches only for a RestrictedUnpickler call
        if MARKER in line and "RestrictedUnpickler(" not in line:
            found.append((i, "restricted-unpickler marker on a line that does not call RestrictedUnpickler"))
    return sorted(set(found))


def test_no_unsafe_unpickling_in_product_code():
    files = _product_files()
    assert any(f.name == "data.py" for f in files) and len(files) > 20, files
    bad = []
    markers = 0
    for f in files:
        source = f.read_text()
        markers += source.count(MARKER)
        bad += [f"{f.relative_to(ROOT)}:{line}: {why}" for line, why in _unsafe_loads(source)]
    assert not bad, "unsafe unpickling in product code:\n" + "\n".join(bad)
    assert markers == 1, f"expected exactly one restricted-unpickler line, found {markers}"


@pytest.mark.parametrize("snippet", [
    "import pickle\nx = pickle.load(open('f', 'rb'))",
    "import pickle\nx = pickle.loads(b'')",
    "from pickle import loads",
    "import torch\ntorch.load('f', weights_only=False)",
    "import torch\ntorch.load('f')",
    "import numpy as np\nnp.load('f.npy', allow_pickle=True)",
    "import pandas as pd\npd.read_pickle('f')",
    "import pickle\npickle.Unpickler(open('f', 'rb')).load()",
    f"import pickle\npickle.load(open('f', 'rb'))  {MARKER}",
])
def test_source_scan_catches(snippet):
    assert _unsafe_loads(snippet), snippet


def test_source_scan_passes_safe_code():
    assert not _unsafe_loads("import torch, numpy as np\ntorch.load('f', weights_only=True)\nnp.load('f.npy')\n"
                             f"b = RestrictedUnpickler(fh, p).load()  {MARKER}\n# pickle.load( in a comment\n"
                             "s = 'weights_only=False in a string'\n")


# ------------------------------------------------------------------ Prefect task results
def test_prefect_persists_and_reads_back_no_task_results(tmp_path):
    """Prefect deserializes a stored result record with the serializer the record names,
    pickle included, so a planted record would run code. The CLI therefore persists no task
    results and disables task caching (the store and the cells folder are the cache): a real
    `know collect` leaves no result files, and its tasks have no cache key to look one up by.
    A malicious record planted in the result folder beforehand is never read."""
    import subprocess
    import sys

    home = tmp_path / "home"
    storage = home / "storage"
    storage.mkdir(parents=True)
    marker = tmp_path / "pwned"
    record = ('{"metadata": {"storage_key": "x", "serializer": {"type": "pickle"}, "prefect_version": "3.8.8"}, '
              '"result": ' + repr(pickle.dumps(RunsShell(marker)).hex()).replace("'", '"') + '}')
    for name in ("planted", "0" * 32):
        (storage / name).write_text(record)
    from test_resume import _env  # Prefect's own ephemeral server here (prefect is imported first): 180 s to boot

    env = _env(home)
    code = ("import know_cli, tasks.collect, tasks.evaluate\n"
            "from prefect.cache_policies import NO_CACHE\n"
            "assert tasks.collect.collect_run.cache_policy == NO_CACHE, tasks.collect.collect_run.cache_policy\n"
            "assert tasks.evaluate.finetune_cell.cache_policy == NO_CACHE\n"
            "know_cli.main(['collect', '--store', %r, '--limit', '200', '--runs', '1', '--stages', '3'])\n"
            % str(tmp_path / "runs.zarr"))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in storage.iterdir()) == ["0" * 32, "planted"]  # nothing new persisted
    assert not marker.exists()
