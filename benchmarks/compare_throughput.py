"""Old against new, side by side: runs benchmarks/train_throughput.py from a git revision and from this
working tree in alternation (same machine, same minutes), and prints both.

    python benchmarks/compare_throughput.py --ref HEAD~1 [--rounds 2] [--new-args=--compile] [--old-args=--compile]
        [-- --cells 50000 --threads 2]

The revision is checked out into a temporary git worktree and imported from there (PYTHONPATH), so
both sides run their own code with this environment's libraries. ``--new-args`` go to this tree's
side only (options the revision's benchmark does not have, such as ``--compile``), ``--old-args`` to the
revision's (compiled against compiled: both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("cells_per_s_full_step", "cells_per_s_model_only", "ms_per_step_full", "ms_per_step_model",
        "ms_per_step_matmul_floor", "peak_rss_mib")


def run(tree: Path, extra: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}  # each side imports its own atlasdgd first: its own OpenMP settings
    out = subprocess.run([sys.executable, str(tree / "benchmarks" / "train_throughput.py"), *extra], env=env,
                         capture_output=True, text=True, cwd=tree)
    if out.returncode:
        raise SystemExit(f"train_throughput.py from {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ref", required=True, help="git revision to compare against (for example HEAD~1)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--new-args", default="", help="extra options for this tree's side only, one string: --new-args=--compile")
    p.add_argument("--old-args", default="", help="extra options for the revision's side only: --old-args=--compile")
    args, extra = p.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        old = Path(tmp) / "ref"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.ref], check=True,
                       capture_output=True)
        try:
            results: dict[str, list[dict]] = {"old": [], "new": []}
            for _ in range(args.rounds):
                results["old"].append(run(old, extra + args.old_args.split()))
                results["new"].append(run(ROOT, extra + args.new_args.split()))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    summary = {"ref": args.ref, "rounds": args.rounds, "args": extra, "new_args": args.new_args.split(),
               "old_args": args.old_args.split()}
    for side, runs in results.items():
        summary[side] = {k: [r[k] for r in runs] for k in KEYS}
        summary[side]["median_cells_per_s_full_step"] = statistics.median(r["cells_per_s_full_step"] for r in runs)
        # the yardstick: the decoder's matmul floor as a share of a full step, same run
        summary[side]["floor_share_full_step"] = round(statistics.median(
            r["ms_per_step_matmul_floor"] / r["ms_per_step_full"] for r in runs), 3)
    summary["new_over_old_full_step"] = round(summary["new"]["median_cells_per_s_full_step"]
                                              / summary["old"]["median_cells_per_s_full_step"], 3)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
