#!/usr/bin/env python3
"""An upper bound of the extension build's wall time with N parallel jobs, from
CPU times measured on another machine.

    python3 scripts/build_time_estimate.py [--jobs 16] [--budget 200] [TIMES]

TIMES (default scripts/build_times.tsv, committed with its provenance) gives
`total_cpu_s` (the CPU time of a whole build, all compile jobs) and
`longest_cpu_s` (the CPU time of its longest single compile job). Whatever
order ninja starts the jobs in, a list schedule on N workers ends by
total / N + (1 - 1/N) * longest (Graham's bound); the estimate adds a fixed
20 s for pip, the link and the import check. It assumes the lent machine's
cores are no slower than the measuring machine's, and counts the measured
build's three CUDA targets (sm_80 SASS, sm_80 PTX, sm_90a) where the GPU
check builds one: pessimistic on both counts.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OVERHEAD_S = 20.0


def read_times(path: str) -> dict[str, tuple[float, str]]:
    """key -> (seconds, note) from a 'key<TAB>seconds[<TAB>note]' file ('#' comments)."""
    out = {}
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        parts = line.rstrip("\n").split("\t")
        out[parts[0]] = (float(parts[1]), parts[2] if len(parts) > 2 else "")
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("times", nargs="?", default=os.path.join(HERE, "build_times.tsv"))
    ap.add_argument("--jobs", type=int, default=16)
    ap.add_argument("--budget", type=float, default=200.0, help="the build step's cap in seconds")
    args = ap.parse_args(argv)
    if not os.path.exists(args.times):
        print(f"no compile times at {args.times}")
        return 1
    t = read_times(args.times)
    total, longest = t["total_cpu_s"][0], t["longest_cpu_s"]
    n = args.jobs
    bound = total / n + (1 - 1 / n) * longest[0] + OVERHEAD_S
    ok = bound <= args.budget
    print(
        f"measured: {total:.0f} CPU s for the whole build, longest job {longest[0]:.0f} CPU s ({longest[1]})"
    )
    print(
        f"{'OK' if ok else 'OVER'}: bound {bound:.0f} s for {n} jobs (Graham: total/N + (1-1/N) longest, "
        f"+{OVERHEAD_S:.0f} s pip/link) against the build cap of {args.budget:.0f} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
