"""9. Ray (`ens run --parallel N`): the dispatch overhead per member, and the wall time of the four-member digits
ensemble with --parallel 2 against the sequential run, on this machine.

- Dispatch overhead: one member (ONE_MEMBER) computed in this process, and as a Ray task of a cluster already
  running (the task re-reads config and data, trains, predicts, writes the cache; the driver reads it back),
  alternately, its cache emptied before each; the first task (which also starts a worker process and imports
  torch and fastai there) apart from the later ones (Ray reuses the worker). The cluster's start-up is timed apart.
- Wall time: `ens run digits/final.yaml` from cold, sequential (torch's threads: every core) and with
  `--parallel 2` (each task 1 CPU and 1 torch thread on two cores; the local cluster's start-up included), in
  alternating order.
"""

import os
import shutil
import sys
import tempfile
import time

from common import ENS, ONE_MEMBER, REPO, digits_project, median, timed


def _dispatch(root, repeats: int) -> tuple[float, float, float, float, int]:
    """(cluster start s, first task's overhead s, median later overhead s, median in-process s, task threads)."""
    import ray
    import torch

    from pipelines.config import Project
    from pipelines.run import run_ensemble
    from pipelines.schedule import Parallel, local_cpus

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    temp = tempfile.mkdtemp(prefix="ensray-", dir="/tmp")
    t = time.perf_counter()
    ray.init(num_cpus=local_cpus(), include_dashboard=False, log_to_driver=False, _temp_dir=temp,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    start = time.perf_counter() - t
    cache = root / "cache" / "digits"

    def once(parallel) -> float:
        shutil.rmtree(cache, ignore_errors=True)
        t0 = time.perf_counter()
        r = run_ensemble(Project(root), "digits/one.yaml", submit=False, parallel=parallel)
        assert r.trained == ["resnet"], r.trained
        return time.perf_counter() - t0

    try:
        threads = local_cpus()
        torch.set_num_threads(threads)  # the task's threads: one task on every core
        first = once(Parallel(n=1)) - once(None)
        local, remote = [], []
        for _ in range(repeats):
            remote.append(once(Parallel(n=1)))
            local.append(once(None))
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
    return start, first, median(remote) - median(local), median(local), threads


def main(repeats: int = 3, runs: int = 2) -> list[str]:
    root = digits_project({"one": ONE_MEMBER, "final": (REPO / "ensembles/digits/final.yaml").read_text()})
    start, first, overhead, local, threads = _dispatch(root, repeats)
    cache = root / "cache" / "digits"
    seq, par = [], []
    for i in range(runs):
        for arm, times, extra in (("sequential", seq, []), ("parallel", par, ["--parallel", "2"]))[::1 if i % 2 == 0 else -1]:
            shutil.rmtree(cache, ignore_errors=True)
            seconds, out = timed(ENS + ["run", "digits/final.yaml", "--no-submit", *extra], root)
            assert "4 trained" in out, out
            times.append(seconds)
    shutil.rmtree(root)
    s, p = median(seq), median(par)
    return [f"| 9. Ray dispatch overhead per member (a task of a running cluster vs in-process; one digits member, "
            f"{threads} threads both) | +{overhead:.2f} s on {local:.1f} s; the first task +{first:.1f} s (worker "
            f"start, imports); local cluster start {start:.1f} s | **{(local + overhead) / local:.3f}** | small "
            "against a real member (minutes) |",
            f"| 9. `ens run digits/final.yaml --parallel 2` / sequential (4 members from cold; parallel: 2 tasks of "
            f"1 CPU and 1 torch thread, cluster start included; sequential: {threads} torch threads) | {p:.1f} s / "
            f"{s:.1f} s | **{p / s:.3f}** | < 1 on {os.cpu_count()} cores |"]


if __name__ == "__main__":
    sys.exit(print("\n".join(main())))
