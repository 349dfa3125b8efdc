"""The benchmark suite: FLOP and byte formulas, the FAIL path of its
correctness gate (outputs and gradients), the summary against the best
baseline, FlexAttention's availability decision, and an end-to-end run on tiny
shapes that writes every output file."""

from __future__ import annotations

import csv
import importlib.util
import io
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)  # run.py and ffn_bench.py import bench_common from here
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def pyfastattn_ffn_kernel() -> bool:
    from pyfastattn import ffn

    return ("ffn_fwd", "cpu") in ffn.KERNELS


def _run():
    return _load("run")


def test_attention_flop_and_byte_formulas():
    run = _run()
    s = run.Shape(b=2, h=3, s=128, d=64, causal=False)
    fwd = 4 * 2 * 3 * 128 * 128 * 64
    assert s.flops("fwd") == fwd
    assert s.flops("bwd") == 2.5 * fwd
    assert s.flops("fwd+bwd") == 3.5 * fwd
    c = run.Shape(b=2, h=3, s=128, d=64, causal=True)
    assert c.flops("fwd") == fwd / 2 and c.flops("bwd") == 2.5 * fwd / 2
    dec = run.Shape(b=2, h=3, s=1000, d=64, causal=False, sq=1)
    assert dec.flops("fwd") == 4 * 2 * 3 * 1 * 1000 * 64
    assert str(dec) == "B2 H3 Sq1 Sk1000 D64"
    # decode reads K and V (2*B*H*Sk*D) plus q, writes out (B*H*1*D each)
    assert dec.bytes_moved("fwd", 2) == 2 * (2 * 2 * 3 * 1000 * 64 + 2 * 2 * 3 * 64)
    n = 2 * 3 * 128 * 64  # one (B, H, S, D) tensor
    assert s.bytes_moved("bwd", 4) == 4 * 8 * n  # read q, k, v, out, dout; write dq, dk, dv
    assert s.bytes_moved("fwd+bwd", 4) == 4 * 12 * n


def test_ffn_flop_formulas():
    ffn_bench = _load("ffn_bench")
    plain = ffn_bench.Shape(tokens=16, d_model=64, gated=False)
    assert plain.d_ff == 256
    assert plain.flops(backward=False) == 2 * (2 * 16 * 64 * 256)  # two GEMMs
    assert plain.flops(backward=True) == 3 * plain.flops(backward=False)
    gated = ffn_bench.Shape(tokens=16, d_model=96, gated=True)
    assert gated.d_ff == 256  # 8/3 * 96 = 256, rounded up to 256
    assert gated.flops(backward=False) == 3 * (2 * 16 * 96 * 256)  # three GEMMs


def test_gate_fails_wrong_output_and_passes_right_one():
    run = _run()
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    good = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert run.check(good, q, k, v, True) is None
    bad = good.clone()
    bad[0, 1, 7, 3] += 1e-2  # one element off
    assert run.check(bad, q, k, v, True).startswith("FAIL")
    assert run.check(F.scaled_dot_product_attention(q, k, v), q, k, v, True).startswith("FAIL")


class _WrongDq(torch.autograd.Function):
    """Right forward, dq scaled by 1.01: only a gradient check catches it."""

    @staticmethod
    def forward(ctx, q):
        return q.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def test_gate_checks_gradients_and_row_subsets():
    run = _run()
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64).float() for _ in range(3))
    sdpa = lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=c)  # noqa: E731
    wrong_dq = lambda q, k, v, c: sdpa(_WrongDq.apply(q), k, v, c)  # noqa: E731
    for full_limit in (1 << 30, 0):  # checked whole, then on a subset of rows
        gate = run.Gate(q, k, v, True, grads=True, full_limit=full_limit, rows=8)
        assert len(gate.rows) == (40 if full_limit else 8)
        assert gate.check(sdpa, q, k, v) is None
        failure = gate.check(wrong_dq, q, k, v)
        assert failure.startswith("FAIL (dq:"), failure
        assert gate.check(lambda q, k, v, c: sdpa(q, k, v, False), q, k, v).startswith("FAIL (out:")


def test_fail_row_is_never_timed():
    run = _run()
    bc = _load("bench_common")
    n_calls = [0]

    def flaky(q, k, v, c):  # passes the gate, then runs out of memory
        n_calls[0] += 1
        if n_calls[0] > 1:
            raise MemoryError("out of memory")
        return F.scaled_dot_product_attention(q, k, v, is_causal=c)

    provs = {
        "flaky": flaky,
        "torch sdpa (math)": run.providers("cpu")[0]["torch sdpa (math)"],
        "wrong": lambda q, k, v, c: F.scaled_dot_product_attention(q, k, v, is_causal=not c),
        "raises": lambda q, k, v, c: (_ for _ in ()).throw(ValueError("no such shape\nmore")),
    }
    env = bc.environment("cpu", 1)
    rows = run.attention_rows(
        "attention-bwd", torch.float32, run.Shape(1, 2, 32, 16, True), provs,
        {"flex": "not here"}, "cpu", 1, True, env, 1.0, 10.0,
    )  # fmt: skip
    by = {(r["provider"], r["pass"]): r for r in rows}
    assert set(p for _, p in by) == {"bwd", "fwd+bwd"}
    for p in ("bwd", "fwd+bwd"):
        assert by[("torch sdpa (math)", p)]["status"] == "ok" and by[("torch sdpa (math)", p)]["p50_ms"] > 0
        assert by[("wrong", p)]["status"].startswith("FAIL") and "p50_ms" not in by[("wrong", p)]
        assert by[("raises", p)]["status"] == "unsupported: no such shape"
        assert by[("flex", p)]["status"] == "unavailable: not here"
        assert by[("flaky", p)]["status"] == "error while timing: out of memory"


def test_summary_against_best_baseline():
    bc = _load("bench_common")

    def row(provider, ms, status="ok"):
        r = dict(provider=provider, suite="attention", dtype="float32", shape="S", status=status)
        r["pass"] = "fwd"
        if status == "ok":
            r["p50_ms"] = ms
        return r

    rows = [
        row("pyfastattn", 2.0),
        row("pyfastattn reference", 0.5),  # not a baseline
        row("GEMM floor", 0.1),  # not a baseline
        row("torch sdpa (math)", 0.2, status="FAIL (out: ...)"),  # failed: not a baseline
        row("torch sdpa (flash)", 3.0),
        row("naive matmul-softmax-matmul", 5.0),
    ]
    (s,) = bc.summarize(rows)
    assert s["best_baseline"] == "torch sdpa (flash)" and s["speedup"] == pytest.approx(1.5)
    assert rows[0]["speedup_vs_best"] == pytest.approx(1.5)
    rows[0].update(status="FAIL (out: x)")
    del rows[0]["p50_ms"]
    (s,) = bc.summarize(rows)
    assert s["pyfastattn_status"].startswith("FAIL") and s["speedup"] == ""


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_availability_and_block_mask():
    run = _run()
    reason = run.flex_unavailable_reason("cpu")
    assert reason is not None and "CUDA" in reason
    provs, unavailable = run.providers("cpu")
    assert run.FLEX in unavailable and run.FLEX not in provs
    # the provider's own code (block mask for causal, cached per length) run eagerly on CPU
    flex = run.flex_provider(compiled=False)
    q, k, v = (torch.randn(1, 2, 150, 16) for _ in range(3))
    for causal in (False, True):
        got = flex(q, k, v, causal)
        assert run.check(got, q, k, v, causal) is None, causal


def test_device_name_and_sanitize():
    bc = _load("bench_common")
    assert bc.sanitize("NVIDIA H200") == "NVIDIA-H200"
    assert bc.sanitize("AMD EPYC 9654 96-Core Processor") == "AMD-EPYC-9654-96-Core-Processor"
    assert bc.sanitize("Intel(R) Xeon(R) @ 2.0GHz") == "Intel-R-Xeon-R-2.0GHz"
    assert bc.device_name("cpu")


@pytest.mark.skipif(not pyfastattn_ffn_kernel(), reason="no CPU FFN kernel")
def test_cpu_peak_memory_counts_the_ffn_scratch():
    """The FFN keeps its [tokens, d_ff] temporaries in a per-thread buffer held
    between calls; the CPU peak must still count them (bench_common switches
    the scratch off for the measured call), and the caller's setting of the
    variable is restored."""
    import pyfastattn

    bc = _load("bench_common")
    tokens, d_model, d_ff = 256, 32, 512
    x = torch.randn(tokens, d_model, requires_grad=True)
    w = [torch.randn(d_ff, d_model, requires_grad=True) for _ in range(2)]
    wd = torch.randn(d_model, d_ff, requires_grad=True)

    def call():
        y = pyfastattn.gated_feed_forward(x, w[0], w[1], wd, activation="silu", recompute=True)
        torch.autograd.grad(y.sum(), [x, *w, wd])

    with pyfastattn.backend("kernel"):
        call()  # the scratch is now held
        before = os.environ.get("PYFASTATTN_CPU_FFN_SCRATCH_MB")
        peak = bc.peak_mib(call, "cpu")
    assert os.environ.get("PYFASTATTN_CPU_FFN_SCRATCH_MB") == before
    # recompute: gate, up and dH live at once in the backward (3 x tokens x d_ff fp32)
    assert peak >= 3 * tokens * d_ff * 4 / 2**20


def test_progress_without_a_terminal():
    bc = _load("bench_common")
    buf = io.StringIO()
    p = bc.Progress(2, stream=buf)
    p.step("first")
    p.step("second")
    p.finish()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[" + "." * 30 + "] 0/2") and "first" in lines[0]
    assert lines[-1].startswith("[" + "#" * 30 + "] 2/2")


def test_plots_skipped_without_matplotlib(monkeypatch, tmp_path):
    bc = _load("bench_common")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    files, why = bc.write_plots(str(tmp_path), [], {}, 1.0)
    assert files == [] and "matplotlib" in why


def test_suite_end_to_end_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, os.path.join(BENCH, "run.py"), "--suite", "all", "--device", "cpu",
         "--dtype", "float32", "--seqlens", "32,64", "--headdims", "16", "--ffn-tokens", "16",
         "--ffn-dmodel", "64", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {x["suite"] for x in rows} == {"attention", "attention-bwd", "ffn"}
    ours = [x for x in rows if x["provider"] == "pyfastattn"]
    # attention: 2 lengths x 2 masks + 2 decode; attention-bwd: 2 x 2 x (bwd, fwd+bwd); ffn: 2 forms x 2 passes
    assert len(ours) == 6 + 8 + 4
    assert all(x["status"] == "ok" and float(x["p50_ms"]) > 0 for x in ours), ours
    assert all(float(x["peak_mem_mib"]) >= 0 and x["peak_mem_mib"] != "nan" for x in ours)
    assert all(float(x["gbps"]) > 0 and 0 < float(x["frac_ceiling"]) for x in ours)
    assert all(x["note"].startswith("bwd: ") for x in ours if x["suite"] == "attention-bwd")
    providers = {x["provider"] for x in rows}
    assert providers >= {"torch sdpa (flash)", "torch sdpa (math)", "naive matmul-softmax-matmul",
                         "pyfastattn reference", "torch eager", "torch.compile"}  # fmt: skip
    flex = [x for x in rows if x["provider"] == "flex attention (compiled)"]
    assert flex and all(x["status"].startswith("unavailable: ") for x in flex)
    assert {x["pass"] for x in rows if x["suite"] == "attention-bwd"} == {"bwd", "fwd+bwd"}

    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert len(summary) == len(ours)
    for s in summary:
        assert s["pyfastattn_status"] == "ok" and s["best_baseline"]
        ratio = float(s["best_baseline_ms"]) / float(s["pyfastattn_ms"])
        assert math.isclose(float(s["speedup"]), ratio, rel_tol=1e-9)

    md = (out / "results.md").read_text()
    assert f"--ffn-dmodel 64 --threads 1 --out {out}" in md  # the exact command line
    assert "## Summary" in md and "device-copy bandwidth" in md and "peak memory:" in md
    assert "summary: pyfastattn against the fastest baseline" in r.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib is not installed" in r.stdout
        assert "plots skipped" in md
    else:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert pngs == ["attention-bwd-float32.png", "attention-float32.png", "ffn-float32.png"]
        assert all((out / p).stat().st_size > 1000 for p in pngs)
        assert "](attention-float32.png)" in md


def test_time_budget_skips_steps_but_writes_every_file(tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, os.path.join(BENCH, "run.py"), "--device", "cpu", "--dtype", "float32",
         "--seqlens", "32", "--headdims", "16", "--threads", "1", "--budget-s", "0.001", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert rows and all(x["status"].startswith("skipped: the run's time budget") for x in rows)
    assert {x["suite"] for x in rows} == {"attention", "attention-bwd", "ffn"}
    assert (out / "summary.csv").exists() and "complete; wall time" in (out / "results.md").read_text()
