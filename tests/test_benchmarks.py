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
import re
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
    assert {x["suite"] for x in rows} == {"attention", "attention-bwd", "decode-kvcache", "ffn"}
    ours = [x for x in rows if x["provider"] == "pyfastattn"]
    # attention: 2 lengths x 2 masks + 2 decode; attention-bwd: 2 x 2 x (bwd, fwd+bwd);
    # decode-kvcache: contiguous and paged; ffn: 2 forms x 2 passes
    assert len(ours) == 6 + 8 + 2 + 4
    assert all(x["status"] == "ok" and float(x["p50_ms"]) > 0 for x in ours), ours
    decode = [x for x in ours if x["suite"] == "decode-kvcache"]
    kernels = [x for x in ours if x["suite"] != "decode-kvcache"]
    assert all(float(x["peak_mem_mib"]) >= 0 and x["peak_mem_mib"] != "nan" for x in kernels)
    assert all(float(x["gbps"]) > 0 and 0 < float(x["frac_ceiling"]) for x in kernels)
    # memory-bound: a fraction of the read bandwidth this run measured
    assert all(x["bound"] == "memory" and float(x["frac_copy_bw"]) > 0 for x in decode), decode
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
        assert s["pyfastattn_status"] == "ok"
        if s["suite"] == "decode-kvcache" and "paged" in s["shape"]:
            continue  # no baseline reads a paged cache in place
        assert s["best_baseline"]
        ratio = float(s["best_baseline_ms"]) / float(s["pyfastattn_ms"])
        assert math.isclose(float(s["speedup"]), ratio, rel_tol=1e-9)

    md = (out / "results.md").read_text()
    assert f"--ffn-dmodel 64 --threads 1 --out {out}" in md  # the exact command line
    assert "## Summary" in md and "peak memory:" in md
    assert "peak (csrc/cpu/peak_probe.cpp" in md and "read bandwidth (every thread" in md
    assert "summary: pyfastattn against the fastest baseline" in r.stdout
    if importlib.util.find_spec("matplotlib") is None:
        assert "plots skipped: matplotlib is not installed" in r.stdout
        assert "plots skipped" in md
    else:
        pngs = sorted(p.name for p in out.glob("*.png"))
        suites = ["attention-bwd", "attention", "ffn"]
        assert pngs == sorted(
            [f"{s}-float32.png" for s in suites] + [f"speedup-{s}-float32.png" for s in suites]
        )
        assert all((out / p).stat().st_size > 1000 for p in pngs)
        assert "](attention-float32.png)" in md and "](speedup-attention-float32.png)" in md
    assert "USDT" not in r.stderr and "USDT" not in r.stdout
    assert f"results go to {out}" in r.stdout
    ok = [x for x in rows if x["status"] == "ok"]
    assert all(float(x["spread"]) >= 0 and int(x["samples"]) >= 2 for x in ok)


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
    assert {x["suite"] for x in rows} == {"attention", "attention-bwd", "decode-kvcache", "ffn"}
    assert (out / "summary.csv").exists() and "complete; wall time" in (out / "results.md").read_text()


def test_adaptive_timer_stops_on_a_steady_call_and_bounds_a_noisy_one():
    import time

    bc = _load("bench_common")
    t0 = time.perf_counter()
    steady = bc.time_cpu(lambda: sum(range(2000)), 1, min_run_time=0.01, max_run_time=0.5)
    assert len(steady) >= 5 and time.perf_counter() - t0 < 5
    calls = [0]

    def noisy():  # every other call 3x slower: the spread never settles
        calls[0] += 1
        time.sleep(0.003 if calls[0] % 2 else 0.001)

    t0 = time.perf_counter()
    times = bc.time_cpu(noisy, 1, min_run_time=0.01, max_run_time=0.1, warmup=False)
    assert bc.spread(times) > bc.SPREAD_WARN
    # bounded by max_run_time (plus one sample); unbounded, it would never stop.
    # The margin is for a loaded machine, where each sleep overshoots.
    assert time.perf_counter() - t0 < 3.0
    st = bc.stats(times)
    assert st["samples"] == len(times) and st["spread"] == pytest.approx(bc.spread(times))


def test_noise_warnings_for_a_busy_machine_and_a_wide_spread():
    bc = _load("bench_common")
    load = bc.LoadWatch.__new__(bc.LoadWatch)
    load.samples = [0.3, 3.5]
    rows = [dict(provider="p", shape="S", dtype="float32", status="ok", spread=0.02)]
    assert bc.noise_warnings(rows, load, threads=8) == []
    (busy,) = bc.noise_warnings(rows, load, threads=2)
    assert "busy" in busy and "3.50" in busy
    rows.append(dict(provider="q", shape="S", dtype="float32", status="ok", spread=0.25))
    (noisy,) = bc.noise_warnings(rows, load, threads=8)
    assert "1 of 2 timed rows" in noisy and "25%" in noisy


def test_output_goes_to_a_new_local_folder_unless_recorded(tmp_path):
    import argparse

    bc = _load("bench_common")
    ap = argparse.ArgumentParser()
    bc.add_common_args(ap)
    a = ap.parse_args([])
    path = bc.out_dir_for(a, "AMD EPYC 9999", "all", stamp="20260101-000000")
    assert path == os.path.join(ROOT, "benchmarks", "results", "local", "20260101-000000-quick-all")
    rec = bc.out_dir_for(ap.parse_args(["--record", "--full"]), "AMD EPYC 9999", "ffn")
    assert rec == os.path.join(ROOT, "benchmarks", "results", "AMD-EPYC-9999", "full-ffn")
    assert bc.out_dir_for(ap.parse_args(["--out", str(tmp_path)]), "x", "all") == str(tmp_path)
    with pytest.raises(SystemExit):
        bc.out_dir_for(ap.parse_args(["--out", str(tmp_path), "--record"]), "x", "all")
    # git ignores the local folder (where the tests run in a git checkout: CI also runs them in a copy)
    inside = subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=ROOT, capture_output=True)
    if inside.returncode == 0:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode
        assert ignored == 0, "benchmarks/results/local/ must be in .gitignore"
    # --record replaces the results of record: no stale file is left beside them
    (tmp_path / "run.log").write_text("old")
    (tmp_path / "results.csv").write_text("old")
    (tmp_path / "README.md").write_text("kept")
    (tmp_path / "sub").mkdir()
    bc.prepare_out_dir(str(tmp_path), record=False)
    assert (tmp_path / "run.log").exists()
    bc.prepare_out_dir(str(tmp_path), record=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]


def test_quiet_native_stderr_drops_profiler_probe_lines():
    code = (
        f"import os, sys; sys.path.insert(0, {BENCH!r}); import bench_common as bc\n"
        "with bc.quiet_native_stderr():\n"
        "    os.write(2, b'USDT:2026 x.cpp:52] profiler_start\\nkept line\\n"
        "ERROR:2026 DeviceProperties.cpp:56] gpuGetDeviceCount failed with code 35\\n')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "kept line\n"


def test_plot_grids_have_no_empty_cells():
    bc = _load("bench_common")
    for n in range(1, 13):
        rows, cols = bc.grid_shape(n)
        assert rows * cols == n, n
        assert cols <= max(4, n if rows == 1 else 4)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_grids_have_four_points_per_curve(device):
    run = _run()
    ffn_bench = _load("ffn_bench")
    for quick in (True, False):
        for suite_fwd in (True, False):
            shapes = run.shapes_for(device, quick, decode=suite_fwd, backward=not suite_fwd)
            curves: dict = {}
            for sh in shapes:
                curves.setdefault(sh.variant(), set()).add(sh.s)
            assert curves and all(len(x) >= 4 for x in curves.values()), (device, quick, curves)
        curves = {}
        for sh in ffn_bench.shapes_for(quick):
            curves.setdefault((sh.form, sh.d_model), set()).add(sh.tokens)
        assert all(len(x) >= 3 if not quick else len(x) >= 4 for x in curves.values()), curves


@pytest.mark.parametrize(
    "script",
    [
        "run.py",
        "ffn_bench.py",
        "ffn_decode_bench.py",
        "attention_peak_ab.py",
        "attention_thread_scaling.py",
        "override_sdpa_model.py",
    ],
)
def test_every_flag_has_a_description(script):
    r = subprocess.run([sys.executable, os.path.join(BENCH, script), "--help"], capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    options = r.stdout[r.stdout.index("options:") :]
    # argparse prints "  --flag ARG   help" or "  --flag ARG" with the help on the next line
    entries = re.split(r"\n(?=  -)", options.split("\n", 1)[1])
    for entry in entries:
        flag, *rest = entry.strip().split("  ", 1)
        assert rest and rest[0].strip(), f"{script}: {flag} has no description"


def test_thread_scaling_reports_every_case_against_the_better_peak():
    """attention_thread_scaling.py in a tiny form: the peak line says it is the
    better of two probes, and every case has its share of that peak and its
    1 -> 2 ratio."""
    r = subprocess.run(
        [sys.executable, os.path.join(BENCH, "attention_thread_scaling.py"), "--rounds", "2", "--reps", "1",
         "--seqlens", "64", "--headdims", "32", "--dtypes", "float32"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "2-thread peak, the better of a probe before and one after: float32" in out, out
    table = out[out.index("| 2T ms  of peak |") :].splitlines()[1:]
    rows = [line for line in table if line.startswith("fwd S64 D32 float32")]
    assert len(rows) == 2, out  # causal and not
    for line in rows:
        share = line.split("|")[1].split()[1]
        assert share.endswith("%") and float(share[:-1]) > 0, line


def test_ffn_decode_roof_is_the_share_of_the_read_bandwidth_the_peak_allows():
    """ffn_decode_bench.roof_fraction: 1 while the read takes longer than the
    arithmetic at the peak, else read time / compute time. The issue's case
    (bf16 gated D1024 F2816 T16, 17.3 MB, 277 MFLOP) on a 2-thread peak of
    1 TFLOP/s: at 40 GB/s memory-bound (roof 1), at 80 GB/s the roof is 78 %."""
    sys.path.insert(0, BENCH)
    try:
        import ffn_decode_bench
    finally:
        sys.path.pop(0)
    wbytes = 3 * 1024 * 2816 * 2
    flops = 2 * 16 * wbytes / 2
    assert ffn_decode_bench.roof_fraction(wbytes, flops, 40.0, 1.0) == 1.0
    roof = ffn_decode_bench.roof_fraction(wbytes, flops, 80.0, 1.0)
    assert abs(roof - (wbytes / 80e9) / (flops / 1e12)) < 1e-12 and 0.77 < roof < 0.79, roof


def test_context_parallel_ulysses_compute_is_the_run_minus_its_communication(tmp_path, monkeypatch):
    """context_parallel_bench.py: Ulysses' ``compute`` is the timed run minus
    the time inside its all-to-alls in that same run, so never negative and
    never above ``total``, and its ``overlap`` is 0. It was the total minus
    the transfers timed separately (``comm``), which came out negative at
    S=256, where the latency-bound all-to-alls are nearly the whole run; a
    separately timed ``comm`` above the total gives that case here, in one
    in-process rank."""
    import torch.distributed as dist

    bench = _load("context_parallel_bench")
    monkeypatch.setattr(bench, "_ulysses_comm_alone", lambda *args: 1000.0)
    rows = []

    class Queue:
        put = rows.append

    cfg = dict(seqlens=[16], methods=["ulysses"], dtype="float32", batch=1, heads=2, head_dim=8, causal=True,
               repeats=2)  # fmt: skip
    threads = torch.get_num_threads()
    try:
        bench._worker(0, 1, str(tmp_path / "store"), cfg, Queue())
    finally:
        torch.set_num_threads(threads)
        if dist.is_initialized():
            dist.destroy_process_group()
    (row,) = rows
    assert row["comm"] == 1000.0
    assert 0.0 <= row["compute"] <= row["total"], row
    assert 0.0 <= row["waited"] <= row["total"] and row["overlap"] == 0.0, row
