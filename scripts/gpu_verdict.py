#!/usr/bin/env python3
"""The verdict of one scripts/gpu_check.sh run: one line per capability,
verified or not, and why, read from what the run left in OUTDIR.

    python3 scripts/gpu_verdict.py OUTDIR [--dry-run]

Reads (each optional; a missing input makes its capabilities "not verified"):
  OUTDIR/summary.txt          one line per step (PASS/FAIL/TIMEOUT/SKIP name ...)
  OUTDIR/tests_gpu.xml        pytest's JUnit XML of the `tests` step
  OUTDIR/resource_usage.txt   cuobjdump --dump-resource-usage of the built module
  OUTDIR/sanitizer.log        compute-sanitizer output, "--- TOOL" before each tool
  OUTDIR/bench/*/results.csv  benchmarks/run.py rows (provider, suite, pass, status, p50_ms)
Writes OUTDIR/verdict.csv, OUTDIR/verdict.md and OUTDIR/auto_shapes.csv
(per benchmarked shape: whether the kernel was correct there and faster than
every torch SDPA backend measured in the same run -- the rule for making it
`auto`'s choice), and prints the verdict lines last. Standard library only,
so that it runs on any machine (and in the dry run, where nothing ran).
Exit status 0 whatever the verdict: the lines are the result.
"""

from __future__ import annotations

import csv
import os
import re
import sys
import xml.etree.ElementTree as ET

# capability -> (what it claims, regex over "file::test" of the gpu tests that prove it)
TEST_CAPABILITIES = [
    (
        "attention forward",
        "CUDA forward matches the float64 reference under the tolerance rule "
        "(head dims, dtypes, causal both alignments, GQA, varlen, window, softcap, masks)",
        r"tests/test_gpu\.py::|tests/test_attention_kernel\.py::test_cuda_kernel",
    ),
    (
        "attention backward",
        "CUDA backward dQ/dK/dV match the fp32 reference's gradients under the "
        "tolerance rule (same feature matrix)",
        r"tests/test_gpu_attention_bwd\.py::",
    ),
    (
        "dropout and ALiBi",
        "CUDA forward and backward with dropout and ALiBi match the float64 reference computed with the "
        "same keep pattern; CPU and CUDA drop the same elements for the same (seed, offset)",
        r"tests/test_dropout_alibi\.py::test_cuda_|test_cpu_and_cuda_drop_the_same_elements",
    ),
    (
        "deterministic backward",
        "bit-identical runs; multi-wave grids (> 32 CTAs per SM) finish under a watchdog",
        r"deterministic",
    ),
    (
        "misaligned inputs",
        "offset views are copied, results bit-equal to aligned copies, the CUDA context survives",
        r"misaligned|unaligned",
    ),
    (
        "NaN-poisoned outputs",
        "every output element written (outputs and workspaces start as NaN)",
        # the tests that take the poison fixture
        r"poison|test_cuda_kernel_forward_matches_reference|test_cuda_kernel_varlen|"
        r"test_cuda_ffn_matches_reference|test_cuda_ffn_float32_composition",
    ),
    (
        "KV-cache attention",
        "CUDA append/rotary, split-KV paged attention (the default CUDA-core split kernel) and combine "
        "match the float64 reference and the CPU op (paged 16/64/256, GQA, leftpad, batch idx, ALiBi)",
        r"tests/test_gpu_kvcache\.py::.*\[simt(-|\])",
    ),
    (
        "KV-cache attention, tensor-core split kernel",
        "the same tests with PYFASTATTN_KVCACHE_CUDA_KERNEL=mma (kvcache_split_mma_kernel)",
        r"tests/test_gpu_kvcache\.py::.*\[mma(-|\])",
    ),
    (
        "FFN",
        "CUDA FFN (fused GEMMs and cuBLAS paths) matches the float64 reference",
        r"tests/test_ffn_gpu\.py::",
    ),
]
SDPA_PREFIX = "torch sdpa ("


def read_steps(out: str) -> dict[str, str]:
    """step name -> its summary line."""
    steps = {}
    path = os.path.join(out, "summary.txt")
    if os.path.exists(path):
        for line in open(path):
            m = re.match(r"(PASS|FAIL|TIMEOUT|SKIP|DRY) (\S+?):? ", line)
            if m:
                steps[m.group(2)] = line.strip()
    return steps


def read_junit(out: str) -> list[tuple[str, str]] | None:
    """[(file::name, outcome)] with outcome passed/failed/skipped, or None."""
    path = os.path.join(out, "tests_gpu.xml")
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    cases = []
    for tc in root.iter("testcase"):
        cls = tc.get("classname", "")
        file = cls.replace(".", "/") + ".py" if cls else tc.get("file", "")
        outcome = "passed"
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        cases.append((f"{file}::{tc.get('name', '')}", outcome))
    return cases


def test_verdict(cases, pattern: str, why: str, steps: dict) -> tuple[bool, str]:
    if cases is None:
        step = steps.get("tests", "the tests step did not run")
        return False, f"no test results ({step})"
    mine = [(n, o) for n, o in cases if re.search(pattern, n)]
    ran = [(n, o) for n, o in mine if o != "skipped"]
    failed = [n for n, o in mine if o == "failed"]
    if failed:
        shown = ", ".join(n.split("::")[-1] for n in failed[:3])
        return (
            False,
            f"{len(failed)} of {len(mine)} tests failed ({shown}{', ...' if len(failed) > 3 else ''})",
        )
    if not ran:
        return (
            False,
            f"{len(mine)} tests collected, none ran (skipped: no GPU?)" if mine else "no test matched",
        )
    return True, f"{len(ran)} tests passed: {why}"


def resource_verdict(out: str, steps: dict) -> tuple[bool, str]:
    path = os.path.join(out, "resource_usage.txt")
    if not os.path.exists(path):
        return False, f"no cuobjdump resource report ({steps.get('build', 'build did not run')})"
    text = open(path).read()
    funcs = re.findall(r"Function (\S+):\s*\n?\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", text)
    if not funcs:
        return False, "cuobjdump printed no kernel resource lines"
    bad = [f for f, _, stack, local in funcs if int(stack) or int(local)]
    if bad:
        return (
            False,
            f"{len(bad)} of {len(funcs)} kernels use stack/local memory (spills), e.g. {bad[0][:80]}",
        )
    return True, f"{len(funcs)} kernels in the built module, 0 bytes stack and local memory (no spills)"


def sanitizer_verdict(out: str, tool: str, steps: dict) -> tuple[bool, str]:
    path = os.path.join(out, "sanitizer.log")
    if not os.path.exists(path):
        return False, f"no sanitizer log ({steps.get('sanitizer', 'the sanitizer step did not run')})"
    text = open(path).read()
    m = re.search(rf"--- {tool}\n(.*?)(?=\n--- |\Z)", text, re.S)
    if not m:
        return False, f"{tool} did not run ({steps.get('sanitizer', '?')})"
    body = m.group(1)
    if "Device not supported" in body or "not supported on this" in body:
        return False, f"compute-sanitizer cannot run {tool} on this machine (device not supported)"
    # memcheck ends with "ERROR SUMMARY: N errors"; racecheck with
    # "RACECHECK SUMMARY: H hazards displayed (N errors, W warnings)" (seen on
    # the H200, compute-sanitizer of CUDA 13.0).
    summ = re.findall(r"ERROR SUMMARY: (\d+) error", body) or re.findall(
        r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?", body
    )
    if not summ:
        return False, f"{tool} printed no ERROR SUMMARY (cut off by the time limit?)"
    if int(summ[-1]) or "small shapes ok" not in body:
        return False, f"{tool}: {summ[-1]} errors" + (
            "" if "small shapes ok" in body else ", workload did not finish"
        )
    return True, f"{tool}: 0 errors on scripts/gpu_small_shapes.py"


def bench_rows(out: str) -> list[dict] | None:
    """The rows of every benchmarks/run.py call of the bench step (bench/*/results.csv)."""
    root = os.path.join(out, "bench")
    paths = (
        [os.path.join(root, d, "results.csv") for d in sorted(os.listdir(root))]
        if os.path.isdir(root)
        else []
    )
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        return None
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def ms(r: dict) -> float:
    try:
        return float(r.get("p50_ms") or "nan")
    except ValueError:
        return float("nan")


def per_shape(rows: list[dict]) -> list[dict]:
    """One record per (suite, pass, dtype, shape): ours against the fastest torch SDPA backend."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(
            (r.get("suite", ""), r.get("pass", ""), r.get("dtype", ""), r.get("shape", "")), []
        ).append(r)
    recs = []
    for (suite, pass_, dtype, shape), rs in groups.items():
        ours = next((r for r in rs if r.get("provider") == "pyfastattn"), None)
        if ours is None:
            continue
        if suite == "ffn":
            base = [r for r in rs if r.get("provider") == "torch eager" and r.get("status") == "ok"]
        else:
            base = [
                r for r in rs if r.get("provider", "").startswith(SDPA_PREFIX) and r.get("status") == "ok"
            ]
        best = min(base, key=ms, default=None)
        correct = ours.get("status") == "ok"
        speedup = ms(best) / ms(ours) if best is not None and correct and ms(ours) > 0 else float("nan")
        recs.append(
            dict(
                suite=suite,
                pass_=pass_,
                dtype=dtype,
                shape=shape,
                pyfastattn_status=ours.get("status", ""),
                pyfastattn_ms=ms(ours) if correct else "",
                best_torch=best.get("provider") if best else "",
                best_torch_ms=ms(best) if best else "",
                speedup=speedup,
                choose_kernel=bool(correct and best is not None and speedup > 1.0),
            )
        )
    return recs


def speed_verdict(recs, suite: str, pass_: str | None, what: str) -> tuple[bool, str]:
    mine = [r for r in recs if r["suite"] == suite and (pass_ is None or r["pass_"] == pass_)]
    if not mine:
        return False, f"no {what} rows in the benchmark results"
    wrong = [r for r in mine if r["pyfastattn_status"].startswith("FAIL")]
    timed = [r for r in mine if r["pyfastattn_status"] == "ok" and r["best_torch"]]
    faster = [r for r in timed if r["choose_kernel"]]
    if wrong:
        return (
            False,
            f"FAILED the correctness gate on {len(wrong)} of {len(mine)} shapes (e.g. {wrong[0]['shape']})",
        )
    if not timed:
        return False, f"no shape timed against torch ({mine[0]['pyfastattn_status'][:80]})"
    sp = sorted(r["speedup"] for r in timed)
    med = sp[len(sp) // 2]
    ok = len(faster) == len(timed)
    return ok, (
        f"faster than the best torch backend on {len(faster)} of {len(timed)} shapes "
        f"(median speedup {med:.2f}x, range {sp[0]:.2f}-{sp[-1]:.2f}x)"
    )


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(__doc__)
        return 2
    out = argv[0]
    dry = "--dry-run" in argv
    steps = read_steps(out)
    cases = read_junit(out)
    lines: list[tuple[str, bool, str]] = []
    lines.append(("sm_90a build, no spills", *resource_verdict(out, steps)))
    for name, why, pattern in TEST_CAPABILITIES:
        lines.append((name, *test_verdict(cases, pattern, why, steps)))
    for tool in ("memcheck", "racecheck"):
        lines.append((f"compute-sanitizer {tool}", *sanitizer_verdict(out, tool, steps)))
    rows = bench_rows(out)
    recs = per_shape(rows) if rows is not None else []
    if rows is None:
        why = f"no benchmark results ({steps.get('bench', 'the bench step did not run')})"
        for name in ("speed: attention fwd", "speed: attention fwd+bwd", "speed: FFN vs torch eager"):
            lines.append((name, False, why))
    else:
        lines.append(("speed: attention fwd", *speed_verdict(recs, "attention", "fwd", "attention fwd")))
        lines.append(
            ("speed: attention fwd+bwd", *speed_verdict(recs, "attention-bwd", "fwd+bwd", "fwd+bwd"))
        )
        lines.append(("speed: FFN vs torch eager", *speed_verdict(recs, "ffn", None, "FFN")))
    if dry:
        lines = [(n, False, "dry run: nothing ran on a GPU") for n, _, _ in lines]

    with open(os.path.join(out, "auto_shapes.csv"), "w", newline="") as f:
        fields = [
            "suite",
            "pass_",
            "dtype",
            "shape",
            "pyfastattn_status",
            "pyfastattn_ms",
            "best_torch",
            "best_torch_ms",
            "speedup",
            "choose_kernel",
        ]
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in recs:
            w.writerow(r)
    with open(os.path.join(out, "verdict.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["capability", "verified", "why"])
        for name, ok, why in lines:
            w.writerow([name, "verified" if ok else "not verified", why])
    text = [f"{'VERIFIED' if ok else 'NOT VERIFIED'} {name}: {why}" for name, ok, why in lines]
    with open(os.path.join(out, "verdict.md"), "w") as f:
        f.write("# GPU check verdict\n\n")
        f.write("One line per capability, read from this run's outputs by scripts/gpu_verdict.py.\n")
        f.write("`auto` may choose the kernel only for the shapes marked choose_kernel in auto_shapes.csv\n")
        f.write("(correct and faster than every torch SDPA backend measured in the same run).\n\n")
        f.write("| capability | verdict | why |\n| --- | --- | --- |\n")
        for name, ok, why in lines:
            f.write(f"| {name} | {'verified' if ok else 'not verified'} | {why} |\n")
        if recs:
            f.write(
                "\n## Per shape (auto_shapes.csv)\n\n| suite | pass | dtype | shape | ours ms | best torch | "
                "torch ms | speedup | kernel under auto |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
            )
            for r in recs:
                f.write(
                    f"| {r['suite']} | {r['pass_']} | {r['dtype']} | {r['shape']} | "
                    f"{r['pyfastattn_ms'] if r['pyfastattn_ms'] == '' else format(r['pyfastattn_ms'], '.3f')} | "
                    f"{r['best_torch']} | "
                    f"{r['best_torch_ms'] if r['best_torch_ms'] == '' else format(r['best_torch_ms'], '.3f')} | "
                    f"{'' if r['speedup'] != r['speedup'] else format(r['speedup'], '.2f')} | "
                    f"{'yes' if r['choose_kernel'] else 'no'} |\n"
                )
        f.write("\n" + "\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
