"""`make bench`: every benchmark, side by side measurements as ratios, the table written to BENCHMARKS.md."""

import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["overhead", "efficiency", "warm_rerun", "ablation", "tta_cost", "data_loading", "bench_batching", "gpu_members",
           "parallel", "recipe", "host_side"]


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    import torch

    return (f"{date.today()}, {platform.machine()} {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'no GPU'}")


def write_rows(prefix: str, rows: list[str], path: Path = HERE.parent / "BENCHMARKS.md") -> None:
    """Put `rows` in BENCHMARKS.md's table in place of the rows starting with `| {prefix}` (where the first of
    them was; at the table's end when there were none): one script rerun alone (`make bench-gpu`) updates its
    rows and leaves the others as the last `make bench` wrote them."""
    lines = path.read_text().splitlines()
    mine = [i for i, line in enumerate(lines) if line.startswith(f"| {prefix}")]
    table = [i for i, line in enumerate(lines) if line.startswith("| ")]
    at = mine[0] if mine else table[-1] + 1
    kept = [line for i, line in enumerate(lines) if i not in set(mine)]
    kept[at:at] = rows
    path.write_text("\n".join(kept) + "\n")


def main() -> None:
    sys.path.insert(0, str(HERE))
    rows, start = [], time.perf_counter()
    for name in SCRIPTS:
        print(f"{name} ...", flush=True)
        t = time.perf_counter()
        lines = __import__(name).main()
        rows += lines
        print("\n".join(lines) + f"\n  ({time.perf_counter() - t:.0f} s)", flush=True)
    text = (f"# Benchmarks\n\nLatest `make bench` ({time.perf_counter() - start:.0f} s): {machine()}.\n"
            "Each figure is a ratio of two things measured side by side in one run (alternating, medians), because "
            "absolute times drift on shared machines.\n\n| what | measured | ratio | goal |\n|---|---|---|---|\n"
            + "\n".join(rows) + "\n")
    (HERE.parent / "BENCHMARKS.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
