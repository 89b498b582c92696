"""known_residual's fast path (refolded layers, exp2; know_core.known._fold_stream) against the
float32 module, a float64 module and the authors' TensorFlow outputs.

The refolding changes float32 rounding, not the function. Tolerances come from measurements
on the official weights (benchmarks/bench_known.py, 2026-11):

  vs TF reference outputs     max 5.0e-8 (conv), 1.4e-8 (fc), 9.8e-9 (bias)  -> bound 1e-7
  vs float32 module           max 7.1e-8 at weight scales <= 0.1             -> bound 2e-7
  vs float64 module           at every scale 1e-3..3, the fast path's error is 0.5-0.7x the
                              float32 module's own error                      -> bound 1.5x + 1e-8

No bfloat16 or compiled path is used: bf16 was slower here (0.8-0.9x) and its errors reach
8-57% of the mean residual (max 1.3e-3 against means of 2e-3 to 9e-3); torch.compile ran at
0.73x the eager fast path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from know_core.known import KNOWN, known_residual, load_official

from conftest import REFERENCE_DIR as REF_DIR

KINDS = ("conv", "fc", "bias")
SCALES = (1e-3, 1e-2, 1e-1, 1.0, 3.0)

needs_reference = pytest.mark.needs_reference  # skipped by conftest when REF_DIR is absent


@pytest.fixture(scope="module")
def official(reference_dir):
    return load_official(reference_dir)


def trajectories(scale: float, n: int = 20000, seed: int = 0) -> torch.Tensor:
    """Smooth windows like real weight trajectories: a level plus a small random walk."""
    rng = np.random.default_rng(seed)
    w = scale * (rng.standard_normal((n, 1)) + 0.05 * rng.standard_normal((n, 5)).cumsum(1))
    return torch.from_numpy(w.astype(np.float32))


def random_model(seed: int) -> KNOWN:
    torch.manual_seed(seed)
    m = KNOWN()
    with torch.no_grad():
        for p in m.parameters():  # trained-looking weights, not the near-zero init
            p.normal_(0, 0.3)
    return m.eval()


@needs_reference
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_matches_tensorflow_reference(official, kind):
    ref = np.load(REF_DIR / "known_reference_outputs.npz")
    got = known_residual(official.models[kind], torch.from_numpy(ref[f"{kind}_input"]))
    np.testing.assert_allclose(got.numpy(), ref[f"{kind}_raw_output"], rtol=0, atol=1e-7)


@needs_reference
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_is_as_accurate_as_the_float32_module(official, kind):
    """Against float64 truth, the refolded float32 path errs no more than the float32 module."""
    m = official.models[kind]
    m64 = KNOWN().double()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    for i, scale in enumerate(SCALES):
        x = trajectories(scale, seed=i)
        with torch.no_grad():
            truth = m64(x.double())
            module = m(x)
        fast = known_residual(m, x)
        err_fast = (fast.double() - truth).abs().max().item()
        err_module = (module.double() - truth).abs().max().item()
        assert err_fast <= 1.5 * err_module + 1e-8, f"scale {scale}: fast {err_fast:.2e} vs module {err_module:.2e}"
        if scale <= 0.1:
            assert (fast - module).abs().max().item() < 2e-7, f"scale {scale}"


@pytest.mark.parametrize("seed", [1, 2])
def test_fast_path_matches_module_with_arbitrary_weights(seed):
    """The refolding is algebra, not a property of the released weights."""
    m = random_model(seed)
    x = trajectories(0.1, n=5000, seed=seed)
    with torch.no_grad():
        want = m(x)
    torch.testing.assert_close(known_residual(m, x), want, rtol=1e-5, atol=1e-6)


def test_float64_model_folds_in_float64():
    m = random_model(3).double()
    x = trajectories(0.1, n=2000, seed=3).double()
    with torch.no_grad():
        want = m(x)
    got = known_residual(m, x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("threads", [1, 2])
def test_default_batch_follows_threads(threads):
    """batch_size=None (CPU_BATCH per intra-op thread) gives the same numbers at any thread count."""
    m = random_model(4)
    x = trajectories(0.1, n=20000, seed=4)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = known_residual(m, x)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(got, known_residual(m, x, batch_size=1000), rtol=1e-6, atol=1e-7)
