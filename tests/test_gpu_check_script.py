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
