"""scripts/gpu_check.sh without a GPU (runs everywhere, not marked gpu): the
script parses, its default steps' caps fit its budget, and its dry run
exercises every step's plumbing -- the gpu tests collect, the sanitizer
workload and benchmarks/run.py accept the arguments the steps pass, the
build-time bound fits the build cap, and the verdict writes one line per
capability (all "not verified": nothing ran on a GPU)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu-check"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    r = subprocess.run(["bash", SCRIPT, "--dry-run", str(out)], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)  # fmt: skip
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    plan = re.search(r"plan: .* = (\d+) s of a (\d+) s budget", log)
    assert plan and int(plan.group(1)) <= int(plan.group(2)) <= 480, log[-2000:]
    assert "OK: bound" in log, log[-2000:]  # scripts/build_time_estimate.py: 16 jobs, sm_90a
    summary = (out / "summary.txt").read_text().splitlines()
    verdict = [line for line in summary if "VERIFIED" in line]
    assert len(verdict) >= 10 and all(line.startswith("NOT VERIFIED") for line in verdict), summary
    assert summary[-1].startswith("dry run done") and summary[-2].startswith("NOT VERIFIED"), summary
    for name in ("verdict.md", "verdict.csv", "auto_shapes.csv"):
        assert (out / name).exists(), name


def test_gpu_verdict_reads_a_run(tmp_path):
    """scripts/gpu_verdict.py on a synthetic run: per-test outcomes map to
    capabilities, the sanitizer and resource reports are read, and a shape
    goes to auto_shapes.csv as the kernel's only where it passed the gate and
    beat every torch SDPA backend."""
    out = tmp_path
    (out / "summary.txt").write_text(
        "PASS build 80 s\nPASS tests 90 s\nFAIL sanitizer rc=1 30 s\nPASS bench 100 s\n"
    )
    (out / "tests_gpu.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_gpu" name="test_cuda_head_dims_including_padded[64]"/>'
        '<testcase classname="tests.test_gpu" name="test_cuda_misaligned_offset_views_are_copied_not_faulted"/>'
        '<testcase classname="tests.test_gpu_attention_bwd" name="test_cuda_backward_dense[case0]">'
        '<failure message="x"/></testcase>'
        '<testcase classname="tests.test_gpu_attention_bwd" name="test_cuda_backward_deterministic_bit_identical_10_runs"/>'
        '<testcase classname="tests.test_ffn_gpu" name="test_dispatch_table_rules"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    (out / "resource_usage.txt").write_text(
        "Resource usage:\n Function _Zkernel1:\n  REG:240 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:848\n"
        " Function _Zkernel2:\n  REG:128 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:848\n"
    )
    (out / "sanitizer.log").write_text(
        "--- memcheck\nsmall shapes ok\n========= ERROR SUMMARY: 0 errors\n"
        "--- racecheck\n========= Error: Device not supported\n"
    )
    (out / "bench" / "attention").mkdir(parents=True)
    head = "provider,suite,pass,dtype,shape,status,p50_ms\n"
    rows = [
        "pyfastattn,attention,fwd,bfloat16,B8 H16 S2048 D128,ok,1.0",
        "torch sdpa (flash),attention,fwd,bfloat16,B8 H16 S2048 D128,ok,1.2",
        "torch sdpa (math),attention,fwd,bfloat16,B8 H16 S2048 D128,ok,9.0",
        "pyfastattn,attention,fwd,bfloat16,B1 H16 S16384 D128,ok,5.0",
        "torch sdpa (cudnn),attention,fwd,bfloat16,B1 H16 S16384 D128,ok,4.0",
    ]
    (out / "bench" / "attention" / "results.csv").write_text(head + "\n".join(rows) + "\n")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_verdict.py"), str(out)],
                       capture_output=True, text=True, check=True)  # fmt: skip
    lines = {line.split(":")[0]: line for line in r.stdout.splitlines()}
    assert lines["VERIFIED sm_90a build, no spills"].endswith("(no spills)")
    assert "VERIFIED attention forward" in lines
    assert "NOT VERIFIED attention backward" in lines and "1 of 2 tests failed" in r.stdout
    assert "VERIFIED misaligned inputs" in lines
    assert "NOT VERIFIED FFN" in lines  # collected, skipped: not verified
    assert "VERIFIED compute-sanitizer memcheck" in lines
    assert "device not supported" in lines["NOT VERIFIED compute-sanitizer racecheck"]
    fwd = next(
        line for line in r.stdout.splitlines() if line.startswith("NOT VERIFIED speed: attention fwd:")
    )
    assert "on 1 of 2 shapes" in fwd, fwd
    auto = (out / "auto_shapes.csv").read_text().splitlines()
    assert any("S2048" in a and a.endswith("True") for a in auto)
    assert any("S16384" in a and a.endswith("False") for a in auto)
    assert (out / "verdict.md").read_text().rstrip().splitlines()[-1].startswith("NOT VERIFIED speed: FFN")


def test_verdict_reads_racecheck_summary_as_the_h200_prints_it(tmp_path):
    """compute-sanitizer's racecheck (CUDA 13.0, first H200 run) ends with a
    RACECHECK SUMMARY line, not memcheck's ERROR SUMMARY: both are read, and a
    racecheck error count other than 0 is not verified."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_verdict", os.path.join(ROOT, "scripts", "gpu_verdict.py"))
    verdict = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(verdict)
    clean = (
        "--- memcheck\n========= COMPUTE-SANITIZER\nsmall shapes ok\n========= ERROR SUMMARY: 0 errors\n"
        "--- racecheck\n========= COMPUTE-SANITIZER\nsmall shapes ok\n"
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    )
    (tmp_path / "sanitizer.log").write_text(clean)
    assert verdict.sanitizer_verdict(str(tmp_path), "racecheck", {})[0]
    assert verdict.sanitizer_verdict(str(tmp_path), "memcheck", {})[0]
    (tmp_path / "sanitizer.log").write_text(
        clean.replace("0 hazards displayed (0 errors, 0 warnings)", "3 hazards displayed (2 errors, 1 warning)")
    )
    ok, why = verdict.sanitizer_verdict(str(tmp_path), "racecheck", {})
    assert not ok and "2 errors" in why
