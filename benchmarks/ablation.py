"""4. Ablation: `ens ablate` of 8 cached members (all 255 subsets, greedy selection, 7 combine methods with nested
CV) against `ens --help` (start-up), side by side: the first ablation of these members (the combine methods'
table computed) and a repeat (the table read from its memo); goal: under 1 s beyond start-up. Trains the eight
members once if not cached."""

import shutil
from pathlib import Path

from common import ENS, REPO, median, timed

ENSEMBLE = str(Path(__file__).resolve().parent / "eight_members.yaml")
MEMO = REPO / "cache" / "digits" / ".ablate"  # the combine methods' table, memoised by what it depends on


def main(repeats: int = 7) -> list[str]:
    timed(ENS + ["run", ENSEMBLE], REPO)
    first, again, startup = [], [], []
    for _ in range(repeats):  # alternate, so that drift hits all alike
        shutil.rmtree(MEMO, ignore_errors=True)
        first.append(timed(ENS + ["ablate", ENSEMBLE, "--cached-only", "--top", "5"], REPO)[0])
        again.append(timed(ENS + ["ablate", ENSEMBLE, "--cached-only", "--top", "5"], REPO)[0])
        startup.append(timed(ENS + ["--help"], REPO)[0])
    f, a, s = median(first), median(again), median(startup)
    what = "`ens ablate`, 8 cached members, 255 subsets + greedy + 7 combine methods (nested CV)"
    return [f"| 4. {what}, first / `ens --help` | {f:.2f} s / {s:.2f} s; +{f - s:.2f} s beyond start-up | "
            f"**{f / s:.2f}** | < start-up + 1 s |",
            f"| 4. {what}, repeated (methods' table memoised) / `ens --help` | {a:.2f} s / {s:.2f} s; "
            f"+{a - s:.2f} s beyond start-up | **{a / s:.2f}** | < start-up + 1 s |"]


if __name__ == "__main__":
    print("\n".join(main()))
