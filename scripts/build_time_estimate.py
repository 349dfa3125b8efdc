#!/usr/bin/env python3
"""An upper bound of the extension build's wall time with N parallel jobs,
from the per-file compile times of a build that ran elsewhere.

    python3 scripts/build_time_estimate.py [--jobs 16] [--archs 1] [TIMES]

TIMES: a ninja log (.ninja_log, "start end mtime target hash" in ms) or a
TSV of "seconds<TAB>target" (default: scripts/build_times.tsv, measured with
the full CUDA build of .ci/run step 2 and committed with its provenance).
The bound: the files scheduled longest first on N workers (a list schedule
is within 4/3 of the best, and ninja's is no better than the best), with
each .cu's time scaled by --archs / the number of archs it was measured with
(the GPU check builds one arch, sm_90a; the measured build had three: sm_80
SASS, sm_80 PTX, sm_90a), plus a fixed 20 s for pip, the link and the import
check. Times measured on a loaded 2-core machine are longer than on an idle
core of the lent machine, so the bound is pessimistic there.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OVERHEAD_S = 20.0


def read_times(path: str) -> dict[str, float]:
    times: dict[str, float] = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        if len(parts) >= 4:  # ninja log: start end mtime target [hash]
            times[parts[3]] = (int(parts[1]) - int(parts[0])) / 1000.0
        elif len(parts) == 2:
            times[parts[1]] = float(parts[0])
    return times


def is_cu(target: str) -> bool:
    """A .cu object (nvcc, time proportional to the archs): under csrc/cuda/, not the torch glue."""
    return "/csrc/cuda/" in target.replace(os.sep, "/") and not target.endswith("_api.o")


def makespan(durations: list[float], jobs: int) -> float:
    workers = [0.0] * jobs
    for d in sorted(durations, reverse=True):
        heapq.heappush(workers, heapq.heappop(workers) + d)
    return max(workers)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("times", nargs="?", default=os.path.join(HERE, "build_times.tsv"))
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--archs", type=int, default=1, help="archs the estimated build compiles .cu files for")
    ap.add_argument(
        "--measured-archs", type=int, default=3, help="archs in the measured build (sm_80, PTX, sm_90a)"
    )
    ap.add_argument("--budget", type=float, default=150.0, help="the build step's cap in seconds")
    args = ap.parse_args(argv)
    if not os.path.exists(args.times):
        print(f"no compile times at {args.times}: run a full build and pass its .ninja_log")
        return 1
    times = read_times(args.times)
    scale = args.archs / args.measured_archs
    durs = [t * (scale if is_cu(name) else 1.0) for name, t in times.items()]
    cuda = sum(1 for n in times if is_cu(n))
    longest = max(times.items(), key=lambda kv: kv[1])
    span = makespan(durs, args.jobs) + OVERHEAD_S
    ok = span <= args.budget
    print(
        f"{len(times)} compile jobs ({cuda} CUDA), {sum(times.values()):.0f} s of compiling measured; "
        f"longest {longest[1]:.0f} s ({os.path.basename(longest[0])})"
    )
    print(
        f"{'OK' if ok else 'OVER'}: bound {span:.0f} s for {args.jobs} jobs and {args.archs} arch(s) "
        f"(+{OVERHEAD_S:.0f} s pip/link) against the build cap of {args.budget:.0f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
