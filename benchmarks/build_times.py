#!/usr/bin/env python
"""Per-file compile times of the last build, from ninja's log.

    python benchmarks/build_times.py [BUILD_DIR ...] [--all] [--markdown]

setup.py keeps its objects and ninja's .ninja_log in
build/<python>-torch<version>-<cpu|cuda>/; each build appends one entry per
file it compiled (start and end in ms since that build began). This prints the
files of the last build (or of every build, --all), slowest first, with each
one's wall time, its share of the summed compile time, and the build's span.
Times are wall-clock per job: on a loaded machine, or with more jobs than
cores, they grow; print `uptime` beside them.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_log(path: str) -> list[list[tuple[int, int, str]]]:
    """The builds in a .ninja_log, oldest first, each a list of (start_ms,
    end_ms, output). Entries are written as jobs finish, so within one build
    the end times never decrease: a smaller one starts the next build."""
    builds: list[list[tuple[int, int, str]]] = []
    last_end = None
    with open(path) as f:
        for line in f:
            if line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 4:
                continue
            start, end, out = int(parts[0]), int(parts[1]), parts[3]
            if last_end is None or end < last_end:
                builds.append([])
            builds[-1].append((start, end, out))
            last_end = end
    return builds


def table(entries: list[tuple[int, int, str]], build_dir: str, markdown: bool) -> str:
    rows = sorted(((end - start) / 1e3, os.path.relpath(out, build_dir)) for start, end, out in entries)[::-1]
    total = sum(t for t, _ in rows)
    span = (max(e for _, e, _ in entries) - min(s for s, _, _ in entries)) / 1e3
    lines = []
    if markdown:
        lines += ["| file | wall s | share |", "| --- | ---: | ---: |"]
        lines += [f"| `{name}` | {t:.1f} | {100 * t / total:.0f}% |" for t, name in rows]
        lines.append(f"| **{len(rows)} files: sum / build span** | **{total:.1f} / {span:.1f}** | |")
    else:
        w = max(len(n) for _, n in rows)
        lines += [f"{'file':{w}s} {'wall s':>8s} {'share':>6s}"]
        lines += [f"{name:{w}s} {t:8.1f} {100 * t / total:5.0f}%" for t, name in rows]
        lines.append(f"{len(rows)} files: {total:.1f} s summed, {span:.1f} s from first start to last end")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "build_dirs",
        nargs="*",
        help="build directories holding a .ninja_log (default: every build/*/ of this checkout)",
    )
    ap.add_argument("--all", action="store_true", help="every build in the log, not only the last")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for PERF_NOTES.md)")
    args = ap.parse_args(argv)
    dirs = args.build_dirs or sorted(glob.glob(os.path.join(ROOT, "build", "*", "")))
    found = False
    for d in dirs:
        log = os.path.join(d, ".ninja_log")
        if not os.path.exists(log):
            continue
        found = True
        builds = read_log(log)
        for i, b in enumerate(builds if args.all else builds[-1:]):
            label = f"build {i + 1} of {len(builds)}" if args.all else "last build"
            print(f"\n{os.path.relpath(d, ROOT)} ({label}):")
            print(table(b, os.path.abspath(d), args.markdown))
    if not found:
        print("no .ninja_log found: build first (pip install --no-build-isolation -e .)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
