"""1. Overhead: one digits member through `ens run` (cold: nothing cached) against the hand-written fastai
script doing the same work (hand_fastai.py), both as fresh processes, alternating; goal ratio <= 1.03."""

import shutil
import sys

from common import ENS, ONE_MEMBER, REPO, digits_project, median, timed


def main(repeats: int = 3) -> list[str]:
    ens_times, fastai_times = [], []
    for _ in range(repeats):
        root = digits_project({"one": ONE_MEMBER})
        ens_times.append(timed(ENS + ["run", "digits/one.yaml"], root)[0])
        fastai_times.append(timed([sys.executable, str(REPO / "benchmarks/hand_fastai.py"),
                                   str(REPO / "cache/data/digits"), str(root / "hand.csv")], root)[0])
        shutil.rmtree(root)
    e, f = median(ens_times), median(fastai_times)
    return [f"| 1. overhead: `ens run`, one member, cold / hand-written fastai script | {e:.1f} s / {f:.1f} s "
            f"| **{e / f:.3f}** | <= 1.03 |"]


if __name__ == "__main__":
    print("\n".join(main()))
