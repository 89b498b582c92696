"""Goal 1: KNOWN inference throughput against this machine's dense-matmul FLOP/s and the
authors' TensorFlow implementation (1.21 M params/s on this 2-core machine type).

    .venv/bin/python benchmarks/bench_known.py [--reps 5] [--n 65536] [--no-compile] [--threads 1,2]

Measured in one process, interleaved rep by rep (medians):
  matmul     torch.mm of two 1024x1024 float32 matrices: the machine's dense FLOP/s
  module     chunked KNOWN.forward (the plain torch model) at batch 8192
  legacy     known_residual as it was before this benchmark (two-stream addmm, exp), batch 8192
  fast@B     known_residual now (refolded layers, exp2), batch B
  bf16@B     the fast path with weights and activations in bfloat16
  compiled   torch.compile (inductor, CPU) of the fast path's chunk function
  pool2      the fast path, chunks spread over 2 Python threads with 1 intra-op thread each

FLOP accounting: the model's matmuls cost 17,664 FLOP per scalar (stream A 8,832, stream B
8,704, head 128; elementwise ops not counted). Efficiency ratios use that nominal count; the
refolded fast path executes 14,736 matmul FLOP per scalar.
Each measurement repeats a call on N windows (the reference inputs, tiled) until 0.25 s
have passed, and reports params/s by wall clock and by process CPU time.
"""
from __future__ import annotations

import argparse
import math
import time
from concurrent.futures import ThreadPoolExecutor

from _common import ROOT, fmt_rate, footer, header, interleave, median, ratio_line

import numpy as np
import torch
import torch.nn.functional as F

from know_core import known as K

REF = ROOT.parent / "shared" / "know_reference"
FLOP_NOMINAL = 2 * ((5 * 64 + 64 * 8 + 3 * 8 * 64 + 64 * 32) + (4 * 64 + 64 * 8 + 3 * 8 * 64 + 64 * 32) + 64)
FLOP_EXECUTED = 2 * ((5 * 72 + 8 * 160 + 64 * 32) + (4 * 72 + 8 * 160 + 64 * 32) + 64)
TF_PARAMS_PER_S = 1.21e6  # the authors' TensorFlow KNOWN on this 2-core machine type (issue)
KINDS = ("conv", "fc", "bias")


# ---- the variants --------------------------------------------------------------------------
def module_residual(model, window, batch_size=8192):
    out = torch.empty(window.shape[0])
    with torch.inference_mode():
        for s in range(0, window.shape[0], batch_size):
            out[s:s + batch_size] = model(window[s:s + batch_size])
    return out


def legacy_residual(model, window, batch_size=8192):
    """known_residual before the refolding: base/coef/rate fused, exp, separate Dense8."""
    def weights(st):
        k_t = torch.cat([st.base.weight, st.coef.weight, st.rate.weight]).t()
        b_t = torch.cat([st.base.bias, st.coef.bias, st.rate.bias])
        return (st.inp.weight.t(), st.inp.bias, st.z.weight.t(), st.z.bias, k_t, b_t, st.out.weight.t(), st.out.bias)

    def stream(x, w):
        k_in, b_in, k_z, b_z, k_t, b_t, k_out, b_out = w
        h = torch.addmm(b_in, x, k_in)
        z = torch.addmm(b_z, h, k_z).relu_()
        t = torch.addmm(b_t, z, k_t)
        base = t[:, :64]
        base.addcmul_(t[:, 64:128], h.mul_(t[:, 128:]).exp_())
        return F.leaky_relu_(torch.addmm(b_out, base, k_out), 0.3)

    out = torch.empty(window.shape[0])
    with torch.inference_mode():
        wa, wb = weights(model.stream_a), weights(model.stream_b)
        kh = model.head.weight.t()
        for s in range(0, window.shape[0], batch_size):
            x = window[s:s + batch_size]
            y = torch.addmm(model.head.bias, stream(x, wa), kh[:32])
            y.addmm_(stream(x[:, 1:] - x[:, :-1], wb), kh[32:])
            out[s:s + x.shape[0]] = y.squeeze(1).tanh_()
    return out


class Folded:
    """The fast path's folded weights in a given dtype, and its chunk function."""

    def __init__(self, model, dtype=torch.float32):
        self.dtype = dtype
        self.fa = K._fold_stream(model.stream_a, dtype)
        self.fb = K._fold_stream(model.stream_b, dtype)
        kh = model.head.weight.detach().t().to(dtype)
        self.ka, self.kb = kh[:32, 0].contiguous(), kh[32:, 0].contiguous()
        self.bh = model.head.bias.detach().to(dtype)

    def chunk(self, x):
        x = x.to(self.dtype)
        y = torch.addmv(self.bh, K._stream_folded(x, self.fa), self.ka)
        return y.addmv_(K._stream_folded(x[:, 1:] - x[:, :-1], self.fb), self.kb).tanh_()

    def residual(self, window, batch_size, chunk=None):
        chunk = chunk or self.chunk
        out = torch.empty(window.shape[0])
        with torch.inference_mode():
            for s in range(0, window.shape[0], batch_size):
                out[s:s + batch_size] = chunk(window[s:s + batch_size])
        return out


def pool_residual(folded: Folded, window, batch_size, pool: ThreadPoolExecutor):
    out = torch.empty(window.shape[0])

    def job(s):
        with torch.inference_mode():
            out[s:s + batch_size] = folded.chunk(window[s:s + batch_size])

    list(pool.map(job, range(0, window.shape[0], batch_size)))
    return out


# ---- measurement ---------------------------------------------------------------------------
def matmul_flops(n=1024, min_s=0.25):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    w0, c0, reps = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - w0 < min_s:
        torch.mm(a, b)
        reps += 1
    flop = 2 * n**3 * reps
    return flop / (time.perf_counter() - w0), flop / max(time.process_time() - c0, 1e-9)


def throughput(fn, n, min_s=0.25):
    w0, c0, calls = time.perf_counter(), time.process_time(), 0
    while calls == 0 or time.perf_counter() - w0 < min_s:
        fn()
        calls += 1
    return n * calls / (time.perf_counter() - w0), n * calls / max(time.process_time() - c0, 1e-9)


def parity(models, ref, dtype_label, fn):
    """Max |fn - float32 module| on fresh windows and max |fn - TF reference| per kind."""
    rows = []
    rng = np.random.default_rng(0)
    for kind in KINDS:
        m = models[kind]
        xi = torch.from_numpy(ref[f"{kind}_input"])
        want = torch.from_numpy(ref[f"{kind}_raw_output"])
        scale = float(want.abs().mean())
        fresh = torch.from_numpy((0.05 * (rng.standard_normal((20000, 1)) + 0.05 * rng.standard_normal((20000, 5)).cumsum(1)))
                                 .astype(np.float32))
        with torch.inference_mode():
            f32 = m(fresh)
        d_f32 = float((fn(m, fresh) - f32).abs().max())
        d_ref = float((fn(m, xi) - want).abs().max())
        rows.append((kind, d_f32, d_ref, scale))
        print(f"  parity {dtype_label:9s} {kind:4s}: max|d| vs float32 module {d_f32:.2e}, vs TF reference {d_ref:.2e} "
              f"(reference |residual| mean {scale:.2e})")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--n", type=int, default=1 << 16, help="windows per call")
    ap.add_argument("--threads", default="1,2", help="intra-op thread settings to sweep")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes 20-70 s here)")
    args = ap.parse_args()
    header("KNOWN inference throughput (goal 1)")
    print(f"# torch {torch.__version__}, FLOP per scalar: nominal {FLOP_NOMINAL}, executed by the fast path {FLOP_EXECUTED}")

    ks = K.load_official(str(REF))
    ref = dict(np.load(REF / "known_reference_outputs.npz"))
    models = ks.models
    reps_needed = math.ceil(args.n / 4096)
    windows = {k: torch.from_numpy(np.tile(ref[f"{k}_input"], (reps_needed, 1))[: args.n]).contiguous() for k in KINDS}
    conv, x = models["conv"], windows["conv"]

    print("# parity (max abs deviation)")
    parity(models, ref, "fast f32", lambda m, w: K.known_residual(m, w))
    bf16_par = parity(models, ref, "bf16", lambda m, w: Folded(m, torch.bfloat16).residual(w, 2048).float())

    compiled = None
    if not args.no_compile:
        torch.set_num_threads(1)
        fold = Folded(conv)
        t0 = time.perf_counter()
        try:
            cchunk = torch.compile(fold.chunk, dynamic=False)
            got = fold.residual(x, 2048, cchunk)
            secs = time.perf_counter() - t0
            err = float((got - K.known_residual(conv, x)).abs().max())
            print(f"# torch.compile (inductor, CPU): compiled in {secs:.1f} s, max|d| vs fast path {err:.2e}")
            compiled = (fold, cchunk)
        except Exception as e:  # noqa: BLE001 - report, don't fail the benchmark
            print(f"# torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    best = {}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        fold32, fold16 = Folded(conv), Folded(conv, torch.bfloat16)
        fns = {
            "matmul": lambda: matmul_flops(),
            "module@8192": lambda: throughput(lambda: module_residual(conv, x, 8192), args.n),
            "legacy@8192": lambda: throughput(lambda: legacy_residual(conv, x, 8192), args.n),
            **{f"fast@{b}": (lambda b=b: throughput(lambda: K.known_residual(conv, x, b), args.n))
               for b in (512, 1024, 2048, 4096, 8192, 16384, 65536)},
            "bf16@2048": lambda: throughput(lambda: fold16.residual(x, 2048), args.n),
        }
        if compiled is not None and threads == 1:
            fns["compiled@2048"] = lambda: throughput(lambda: compiled[0].residual(x, 2048, compiled[1]), args.n)
        pool = None
        if threads == 1:
            pool = ThreadPoolExecutor(2)
            fns["pool2@2048"] = lambda: throughput(lambda: pool_residual(fold32, x, 2048, pool), args.n)
        for k in KINDS:
            fns[f"fast-{k}@default"] = (lambda k=k: throughput(lambda: K.known_residual(models[k], windows[k]), args.n))
        res = interleave(fns, args.reps)
        if pool is not None:
            pool.shutdown()
        wall = {k: median([v[0] for v in vals]) for k, vals in res.items()}
        cpu = {k: median([v[1] for v in vals]) for k, vals in res.items()}
        print(f"# threads={threads}: matmul {wall['matmul'] / 1e9:.1f} GFLOP/s wall, {cpu['matmul'] / 1e9:.1f} GFLOP/s per CPU-second")
        for k in fns:
            if k != "matmul":
                print(f"  {k:18s} {fmt_rate(wall[k], 'params/s'):>16s} wall  {fmt_rate(cpu[k], 'params/CPU-s'):>18s}  "
                      f"= {wall[k] * FLOP_NOMINAL / wall['matmul']:.2f} of matmul FLOP/s")
        fast = {k: v for k, v in wall.items() if k.startswith("fast@")}
        top = max(fast, key=fast.get)
        best[threads] = (wall[top], top)
        ratio_line(f"known_vs_matmul_flops_t{threads}", wall[top] * FLOP_NOMINAL / wall["matmul"], 0.5,
                   f"{top}: {fmt_rate(wall[top], 'params/s')} x {FLOP_NOMINAL} FLOP = "
                   f"{wall[top] * FLOP_NOMINAL / 1e9:.1f} GFLOP/s vs matmul {wall['matmul'] / 1e9:.1f} GFLOP/s (wall)")
        ctop = max((k for k in cpu if k.startswith("fast@")), key=cpu.get)
        ratio_line(f"known_vs_matmul_flops_t{threads}_cputime", cpu[ctop] * FLOP_NOMINAL / cpu["matmul"], 0.5,
                   f"{ctop}: {fmt_rate(cpu[ctop], 'params/CPU-s')} vs matmul {cpu['matmul'] / 1e9:.1f} GFLOP/CPU-s")
        ratio_line(f"fast_vs_legacy_t{threads}", wall[top] / wall["legacy@8192"], None,
                   f"{fmt_rate(wall[top], 'params/s')} vs legacy {fmt_rate(wall['legacy@8192'], 'params/s')}")
        ratio_line(f"fast_vs_module_t{threads}", wall[top] / wall["module@8192"], None,
                   f"vs module {fmt_rate(wall['module@8192'], 'params/s')}")
        ratio_line(f"bf16_vs_fast_t{threads}", wall["bf16@2048"] / wall["fast@2048"], None,
                   f"bf16 {fmt_rate(wall['bf16@2048'], 'params/s')} vs f32 {fmt_rate(wall['fast@2048'], 'params/s')}")
        if "compiled@2048" in wall:
            ratio_line("compiled_vs_fast_t1", wall["compiled@2048"] / wall["fast@2048"], None,
                       f"compiled {fmt_rate(wall['compiled@2048'], 'params/s')}")
        if "pool2@2048" in wall:
            ratio_line("pool2_vs_fast_t1", wall["pool2@2048"] / wall["fast@2048"], None,
                       f"2 Python threads x 1 intra-op thread: {fmt_rate(wall['pool2@2048'], 'params/s')}")
        for k in KINDS:
            ratio_line(f"known_{k}_vs_tf_t{threads}", wall[f"fast-{k}@default"] / TF_PARAMS_PER_S, None,
                       f"{fmt_rate(wall[f'fast-{k}@default'], 'params/s')} at the default batch {K.CPU_BATCH * threads}")
    rate, where = max(best.values())
    thr = max(best, key=lambda t: best[t][0])
    ratio_line("known_vs_tf_reference", rate / TF_PARAMS_PER_S, 3.0,
               f"best {fmt_rate(rate, 'params/s')} ({where}, threads={thr}) vs TF {fmt_rate(TF_PARAMS_PER_S, 'params/s')}")
    worst_bf16 = max(d / s for _, _, d, s in bf16_par)
    ratio_line("bf16_error_vs_residual_scale", worst_bf16, None,
               "max |bf16 - TF reference| / mean |reference residual| (bf16 not used: see docs/performance.md)",
               higher_is_better=False)
    footer()


if __name__ == "__main__":
    main()
