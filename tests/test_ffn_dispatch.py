"""The CUDA FFN's dispatch table, without a GPU: the rules the benchmark
derives from timings, and that the table file it writes loads back into the
form the extension takes."""

from __future__ import annotations

import importlib.util
import os

from pyfastattn import _ffn_cuda

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "ffn_bench", os.path.join(ROOT, "benchmarks", "ffn_bench.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(timings):
    """timings: {(gated, tokens, d_model, pass, path): ms}"""
    return [
        dict(
            gated=g,
            tokens=t,
            d_model=d,
            dtype="bfloat16",
            status="ok",
            provider=f"pyfastattn {p}",
            p50_ms=ms,
            **{"pass": ps},
        )
        for (g, t, d, ps, p), ms in timings.items()
    ]


def test_dispatch_rules_pick_the_faster_path_per_class():
    bench = _bench()
    t = {}
    for tok in (16, 512, 8192):
        for dm in (1024, 4096):
            # fused faster forward at T16 only; cuBLAS faster backward except T512 D1024
            t[(False, tok, dm, "fwd", "fused")] = 1.0 if tok == 16 else 3.0
            t[(False, tok, dm, "fwd", "cublas")] = 2.0
            bwd_fused = 1.0 if (tok, dm) == (512, 1024) else 5.0
            t[(False, tok, dm, "fwd+bwd", "fused")] = t[(False, tok, dm, "fwd", "fused")] + bwd_fused
            t[(False, tok, dm, "fwd+bwd", "cublas")] = 2.0 + 2.0
    t[(True, 512, 1024, "fwd", "fused")] = 1.0  # gated: one path failed -> no rule
    rules = bench.dispatch_rules(_rows(t))
    assert len(rules) == 6 and all(not r["gated"] for r in rules)
    by = {r["measured"]: r for r in rules}
    assert by["T16 D1024 bfloat16"]["fwd"] == "fused" and by["T16 D1024 bfloat16"]["bwd"] == "cublas"
    assert by["T512 D1024 bfloat16"]["fwd"] == "cublas" and by["T512 D1024 bfloat16"]["bwd"] == "fused"
    assert by["T8192 D4096 bfloat16"]["fwd"] == "cublas"
    # class bounds: geometric means between measured values, last unbounded
    assert [(r["max_tokens"], r["max_d_model"]) for r in rules] == [
        (90, 2048), (90, -1), (2048, 2048), (2048, -1), (-1, 2048), (-1, -1)
    ]  # fmt: skip
    assert bench._class_bounds([16, 512, 8192]) == [90, 2048, -1]


def test_written_table_loads_as_extension_rules(tmp_path, monkeypatch):
    bench = _bench()
    t = {
        (g, 16, 1024, ps, p): 1.0 + (p == "cublas")
        for g in (False, True)
        for ps in ("fwd", "fwd+bwd")
        for p in ("fused", "cublas")
    }
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "Test GPU")
    path = tmp_path / "table.py"
    bench.write_dispatch(str(path), _rows(t), "python benchmarks/ffn_bench.py --write-dispatch x")
    ns: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    entry = ns["TABLE"]["Test GPU"]
    assert entry["command"].endswith("--write-dispatch x")
    assert _ffn_cuda.rules_for(entry) == [0, -1, -1, 1, 1, 1, -1, -1, 1, 1]
    # a second device is added beside the first
    monkeypatch.setattr(bench.torch.cuda, "get_device_name", lambda *a: "Other GPU")
    bench.write_dispatch(str(path), _rows(t), "cmd")
    ns = {}
    exec(compile(path.read_text(), str(path), "exec"), ns)
    assert set(ns["TABLE"]) >= {"Test GPU", "Other GPU"}
