"""3. Warm re-run: `ens run` with every member cached against the cold run, and against `ens --help`
(start-up); goal: nothing trained, at most start-up + 1 s."""

import shutil

from common import ENS, ONE_MEMBER, digits_project, median, timed


def main(repeats: int = 5) -> list[str]:
    root = digits_project({"one": ONE_MEMBER})
    cold, _ = timed(ENS + ["run", "digits/one.yaml"], root)
    warm, startup = [], []
    for _ in range(repeats):
        seconds, out = timed(ENS + ["run", "digits/one.yaml"], root)
        assert "0 trained" in out, out
        warm.append(seconds)
        startup.append(timed(ENS + ["--help"], root)[0])
    shutil.rmtree(root)
    w, s = median(warm), median(startup)
    return [f"| 3. warm re-run (all cached, nothing trained) / cold run; beyond start-up | {w:.2f} s / {cold:.1f} s; "
            f"+{w - s:.2f} s over `ens --help` ({s:.2f} s) | **{w / cold:.3f}** | <= start-up + 1 s |"]


if __name__ == "__main__":
    print("\n".join(main()))
