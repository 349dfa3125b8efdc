"""The benchmark suite: FLOP formulas, the FAIL path of its correctness gate,
and an end-to-end run on tiny shapes that writes every output file."""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_run():
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "benchmarks", "run.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


def test_flop_formulas():
    run = _load_run()
    s = run.Shape(b=2, h=3, s=128, d=64, causal=False)
    assert s.flops(backward=False) == 4 * 2 * 3 * 128 * 128 * 64
    assert s.flops(backward=True) == 2.5 * 4 * 2 * 3 * 128 * 128 * 64
    c = run.Shape(b=2, h=3, s=128, d=64, causal=True)
    assert c.flops(backward=False) == s.flops(backward=False) / 2


def test_gate_fails_wrong_output_and_passes_right_one():
    run = _load_run()
    q, k, v = (torch.randn(1, 2, 33, 16) for _ in range(3))
    good = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert run.check(good, q, k, v, True) is None
    bad = good.clone()
    bad[0, 1, 7, 3] += 1e-2  # one element off
    assert run.check(bad, q, k, v, True).startswith("FAIL")
    assert run.check(torch.nn.functional.scaled_dot_product_attention(q, k, v), q, k, v, True).startswith(
        "FAIL"
    )


def test_suite_end_to_end_on_tiny_shapes(tmp_path):
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run.py"), "--suite", "attention-bwd", "--device", "cpu",
         "--dtype", "float32", "--seqlens", "64", "--headdims", "16", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "results.md").exists()
    rows = list(csv.DictReader(open(out / "results.csv")))
    ours = [x for x in rows if x["provider"] == "pyfastattn"]
    assert len(ours) == 2 and all(x["status"] == "ok" and float(x["p50_ms"]) > 0 for x in ours)
    assert {x["provider"] for x in rows} >= {"torch sdpa (flash)", "naive matmul-softmax-matmul"}
    assert "vs sdpa" in r.stdout
