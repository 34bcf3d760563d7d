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
           "parallel", "recipe"]


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    import torch

    return (f"{date.today()}, {platform.machine()} {os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, "
            f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'no GPU'}")


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
