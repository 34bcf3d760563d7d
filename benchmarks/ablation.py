"""Benchmark: `ens ablate` of 8 cached members (all 255 subsets) against `ens --help` (start-up), side by side.

Goal (issue: ablation): under 1 s beyond start-up. Trains the eight members once if they are not cached.
Run from the project folder: .venv/bin/python benchmarks/ablation.py
"""

import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENSEMBLE = str(HERE / "eight_members.yaml")
ENS = [sys.executable, "-m", "pipelines.cli"]


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(ENS + args, check=True, capture_output=True, cwd=HERE.parent)
    return time.perf_counter() - start


def main(repeats: int = 7) -> None:
    print("training the eight members if needed ...", flush=True)
    subprocess.run(ENS + ["run", ENSEMBLE], check=True, cwd=HERE.parent, capture_output=True)
    ablate, startup = [], []
    for _ in range(repeats):  # alternate, so that drift hits both alike
        ablate.append(timed(["ablate", ENSEMBLE, "--cached-only", "--top", "5"]))
        startup.append(timed(["--help"]))
    a, s = statistics.median(ablate), statistics.median(startup)
    print(f"ens ablate, 8 members, 255 subsets + greedy: median {a:.3f} s; ens --help: median {s:.3f} s; "
          f"beyond start-up: {a - s:.3f} s (goal < 1 s); ratio {a / s:.2f}")


if __name__ == "__main__":
    main()
