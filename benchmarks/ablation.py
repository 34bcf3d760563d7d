"""4. Ablation: `ens ablate` of 8 cached members (all 255 subsets and greedy selection) against `ens --help`
(start-up), side by side; goal: under 1 s beyond start-up. Trains the eight members once if not cached."""

from pathlib import Path

from common import ENS, REPO, median, timed

ENSEMBLE = str(Path(__file__).resolve().parent / "eight_members.yaml")


def main(repeats: int = 7) -> list[str]:
    timed(ENS + ["run", ENSEMBLE], REPO)
    ablate, startup = [], []
    for _ in range(repeats):  # alternate, so that drift hits both alike
        ablate.append(timed(ENS + ["ablate", ENSEMBLE, "--cached-only", "--top", "5"], REPO)[0])
        startup.append(timed(ENS + ["--help"], REPO)[0])
    a, s = median(ablate), median(startup)
    return [f"| 4. `ens ablate`, 8 cached members, 255 subsets + greedy + 6 combine methods (nested CV) / `ens --help` | {a:.2f} s / {s:.2f} s; "
            f"+{a - s:.2f} s beyond start-up | **{a / s:.2f}** | < start-up + 1 s |"]


if __name__ == "__main__":
    print("\n".join(main()))
