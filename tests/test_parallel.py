"""`ens run --parallel N` / `--address`: members and fold models as Ray tasks (pipelines/schedule.py).

One local Ray cluster serves the whole session (`ray_cluster` in conftest: 2 CPUs, 2 declared GPUs, so that Ray's
GPU scheduling — a CUDA_VISIBLE_DEVICES per task — is exercised on this CPU machine); the node-loss test starts its
own two-node cluster, and the Ctrl-C test lets `ens` start its own local one.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, ens, make_project

from pipelines.config import Project
from pipelines.errors import EnsError
from pipelines.schedule import Connection, Parallel, Slots, Unit, run_units, slots

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

ray = pytest.importorskip("ray")
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probes below run in Ray's workers


# ----------------------------------------------------------------------------------------------- task shapes
def test_slots_one_task_per_gpu_share_and_the_cpus_divided():
    two_gpus = [{"CPU": 8, "GPU": 2}]
    assert slots(two_gpus, Parallel(n=None)) == Slots(2, 4, 1.0)
    assert slots(two_gpus, Parallel(n=1)) == Slots(1, 4, 1.0)  # N caps the tasks at once
    assert slots(two_gpus, Parallel(n=8)) == Slots(2, 4, 1.0)  # and never exceeds the GPU slots
    assert slots(two_gpus, Parallel(n=None, gpus_per_member=0.5)) == Slots(4, 2, 0.5)
    assert slots(two_gpus + [{"CPU": 4, "GPU": 4}], Parallel(n=None)) == Slots(6, 1, 1.0)
    assert slots([{"CPU": 2}], Parallel(n=2)) == Slots(2, 1, 0.0)  # a CPU machine: CPU slots
    assert slots([{"CPU": 2}], Parallel(n=1)) == Slots(1, 2, 0.0)
    assert slots([{"CPU": 4}, {"CPU": 4}], Parallel(n=None)) == Slots(2, 4, 0.0)
    assert slots([{"CPU": 2}], Parallel(n=2, cpus_per_member=2)) == Slots(2, 2, 0.0)


@pytest.mark.parametrize("nodes, opts, message", [
    ([{"CPU": 8, "GPU": 1}], Parallel(gpus_per_member=2), "no node has that many GPUs"),
    ([{"CPU": 2}], Parallel(n=1, cpus_per_member=4), "no node of the Ray cluster has 4 CPUs"),
    ([{"CPU": 0}], Parallel(n=1), "no node with a CPU"),
])
def test_slots_that_no_node_can_hold_are_refused(nodes, opts, message):
    with pytest.raises(EnsError, match=message):
        slots(nodes, opts)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n=0), "--parallel 0"), (dict(gpus_per_member=1.5), "--gpus-per-member 1.5"),
    (dict(cpus_per_member=0), "--cpus-per-member 0")])
def test_bad_parallel_options_are_one_line_errors(kwargs, message):
    with pytest.raises(EnsError, match=message):
        Parallel(**kwargs)


def test_without_parallel_options_ray_is_not_imported(tmp_path):
    code = ("import sys; from pipelines.cli import _parallel; from pipelines import run; "
            "assert _parallel(None, None, 1.0, None) is None; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ,
                         RAY_ADDRESS=""))
    assert out.stdout.strip() == "False", out.stderr


# ----------------------------------------------------------------------------------------------- dispatch
def _probe(seconds: float, progress=None, worker=None) -> dict:
    import torch

    start = time.time()
    task = progress.add_task("probe step", total=2)
    progress.advance(task)
    time.sleep(seconds)
    progress.advance(task)
    progress.remove_task(task)
    return {"start": start, "end": time.time(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "threads": torch.get_num_threads(), "worker": worker}


class _Recording:
    """A stand-in for the driver's rich Progress that remembers what the tasks showed."""

    def __init__(self):
        self.added, self.live, self.said, self._n = [], {}, [], 0
        self.console = self

    def add_task(self, description, total=None, **_):
        self._n += 1
        self.added.append(description)
        self.live[self._n] = 0
        return self._n

    def advance(self, task, amount=1):
        self.live[task] += amount

    def update(self, task, **_):
        pass

    reset = update

    def remove_task(self, task):
        self.live.pop(task)

    def print(self, text, *a, **k):
        self.said.append(text)


def _overlapping(results: list[dict]) -> list[list[dict]]:
    """For each task, the tasks running while it started (itself included)."""
    return [[r for r in results if r["start"] <= s["start"] < r["end"]] for s in results]


def test_never_more_tasks_than_slots_each_on_its_own_gpu_with_explicit_threads(ray_cluster):
    units = [Unit(f"probe {i}", _probe, (1.5,)) for i in range(5)]
    shown = _Recording()
    with Connection(Parallel(n=2)) as conn:
        shape = run_units(conn, units, shown)
    assert shape == Slots(2, 1, 1.0)  # the session cluster: 2 CPUs, 2 declared GPUs
    results = [u.result for u in units]
    groups = _overlapping(results)
    assert max(len(g) for g in groups) == 2  # two at once, never three
    for group in groups:
        assert len({r["cuda"] for r in group}) == len(group)  # Ray gave each running task its own device
    assert {r["cuda"] for r in results} == {"0", "1"}
    assert all(r["threads"] == 1 for r in results)  # torch's threads are the task's CPUs
    assert all(len(u.starts) == 1 and u.starts[0]["cpus"] == 1 for u in units)
    assert sorted(shown.added) == sorted(f"  probe {i}: probe step" for i in range(5))  # the tasks' bars, mirrored
    assert shown.live == {}  # and removed

    with Connection(Parallel(n=1)) as conn:
        units = [Unit(f"one {i}", _probe, (0.5,)) for i in range(3)]
        run_units(conn, units)
    assert max(len(g) for g in _overlapping([u.result for u in units])) == 1


def _fails(folder: str, progress=None, worker=None):
    with open(Path(folder) / "attempts", "a") as f:
        f.write(f"{os.getpid()}\n")
    raise EnsError("members.resnet.lr: -1 is not a learning rate; set a positive one")


def test_an_error_of_ens_own_is_not_retried_and_comes_back_as_its_one_line(ray_cluster, tmp_path):
    units = [Unit("bad", _fails, (str(tmp_path),)), Unit("slow", _probe, (30,))]
    t0 = time.perf_counter()
    with Connection(Parallel(n=2)) as conn, pytest.raises(EnsError, match="^members.resnet.lr: -1 is not a"):
        run_units(conn, units)
    assert len((tmp_path / "attempts").read_text().split()) == 1  # one attempt: no retry
    assert time.perf_counter() - t0 < 25  # the slow task was cancelled, not waited for


# ----------------------------------------------------------------------------------------------- real members
def _entries(root: Path) -> dict:
    out = {}
    for meta_file in (root / "cache" / "digits").glob("*/meta.json"):
        meta = json.loads(meta_file.read_text())
        with np.load(meta_file.parent / "probs.npz") as z:
            out[meta["key"]] = (meta, {k: z[k] for k in z.files})
    return out


def test_a_parallel_run_gives_bitwise_the_sequential_runs_probabilities(ray_cluster, tmp_path, digits_data):
    from pipelines.run import run_ensemble

    par = make_project(tmp_path / "par", digits_data, {"tiny": TINY})
    seq = make_project(tmp_path / "seq", digits_data, {"tiny": TINY})
    result = run_ensemble(Project(par), "digits/tiny.yaml", parallel=Parallel(n=2))
    assert [o.how for o in result.members] == ["trained"] * 3
    assert [o.member.name for o in result.members] == ["convnext", "effnet", "resnet"]  # the YAML's order
    out = ens("run", "digits/tiny.yaml", cwd=seq, env_extra={"OMP_NUM_THREADS": "1"})  # one thread, like each task
    assert out.returncode == 0, out.stderr
    parallel, sequential = _entries(par), _entries(seq)
    assert sorted(parallel) == sorted(sequential) and len(parallel) == 3
    for key, (meta, arrays) in parallel.items():
        assert meta["threads"] == sequential[key][0]["threads"] == 1
        assert meta["worker"]["gpus"] in (["0"], ["1"]) and meta["worker"]["cpus"] == 1
        for name, values in arrays.items():
            assert np.array_equal(values, sequential[key][1][name]), (key, name)
    assert result.valid_score == pytest.approx(float(out.stdout.split("ensemble valid accuracy: ")[1].split()[0]),
                                               abs=1e-4)


RESNET_LONG = TINY.replace("epochs: 1", "epochs: 6").split("members:")[0] + \
    "members:\n  - {name: resnet, arch: test_resnet}\n"


def _kill_when_checkpointed(cache: Path, kill, timeout: float = 240) -> threading.Thread:
    """In the background: once a member's first epoch checkpoint exists, `kill(pid)` the process holding its
    training lock (the Ray worker training it)."""
    def watch():
        end = time.time() + timeout
        while time.time() < end:
            ckpt = list(cache.glob(".partial-*/checkpoint.pth"))
            if ckpt:
                train = ckpt[0].parent.name.removeprefix(".partial-")
                pid = int((cache / ".locks" / f"{train}.lock").read_text().split()[0])
                kill(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_worker_killed_mid_member_is_retried_and_resumes_at_its_epoch(ray_cluster, tmp_path, digits_data):
    from pipelines.run import run_ensemble

    root = make_project(tmp_path / "p", digits_data, {"long": RESNET_LONG})
    killed = []
    watcher = _kill_when_checkpointed(root / "cache" / "digits",
                                      lambda pid: (killed.append(pid), os.kill(pid, signal.SIGKILL)))
    result = run_ensemble(Project(root), "digits/long.yaml", parallel=Parallel(n=1))
    watcher.join(1)
    assert killed, "the watcher never saw a checkpoint"
    (outcome,) = result.members
    assert outcome.how == "resumed"
    assert outcome.entry.meta["resumed_at"].startswith("train epoch ")
    assert outcome.entry.meta["worker"]["pid"] != killed[0]  # a new worker finished it
    assert any("resnet: its Ray worker died 1 time(s) and Ray retried it (resumed at train epoch" in w
               for w in result.warnings)
    assert len(outcome.entry.meta["history"]) == 6  # every epoch, the ones before the kill from the checkpoint


def test_a_task_finding_its_member_changed_fails_once_with_the_reason(ray_cluster, tmp_path, digits_data):
    from pipelines.run import gather_members
    from pipelines.unit import compute_member

    root = make_project(tmp_path / "p", digits_data, {"tiny": TINY})
    unit = Unit("resnet", compute_member, (str(root), str(root / "ensembles/digits/tiny.yaml"), [], "resnet", None,
                                           "0" * 20, "1" * 20, gather_members))
    with Connection(Parallel(n=1)) as conn, pytest.raises(EnsError, match="changed since this run began; run again"):
        run_units(conn, [unit])
    assert len(unit.starts) == 1


def _raylet_node(cluster, pid: int):
    """The node of `cluster` whose raylet started process `pid` (a Ray worker)."""
    from ray._private import ray_constants

    parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for node in cluster.worker_nodes:
        if node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid == parent:
            return node
    return None


def test_a_node_lost_mid_member_and_the_run_still_finishes(tmp_path, digits_data, ray_tmp, monkeypatch):
    """A two-node cluster (ray.cluster_utils, on loopback) joined with --address: the node training the member
    is removed after its first epoch; Ray retries the task on the other node, which resumes from the checkpoint
    in the shared project folder."""
    from ray.cluster_utils import Cluster

    # Cluster writes the head's address to `ray_current_cluster` in Ray's default folder ($RAY_TMPDIR/ray, else
    # $TMPDIR/ray or /tmp/ray), which it never creates: on a machine where Ray never ran it is missing. Point it
    # into this test's folder: it then exists, and no other session's `ray.init()` finds this cluster there.
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    os.makedirs(os.path.join(ray_tmp, "ray"), exist_ok=True)
    root = make_project(tmp_path / "p", digits_data, {"long": RESNET_LONG})
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "temp_dir": ray_tmp, "include_dashboard": False})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        lost = []
        watcher = _kill_when_checkpointed(root / "cache" / "digits",
                                          lambda pid: (lost.append(_raylet_node(cluster, pid)),
                                                       cluster.remove_node(lost[-1])))
        out = ens("run", "digits/long.yaml", "--address", cluster.address, cwd=root, timeout=400)
        watcher.join(1)
    finally:
        cluster.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    assert lost and lost[0] is not None
    assert "resumed (train epoch" in out.stdout
    assert "its Ray worker died 1 time(s) and Ray retried it" in out.stderr


def test_ctrl_c_cancels_the_tasks_and_the_rerun_resumes(tmp_path, digits_data, ray_tmp):
    root = make_project(tmp_path / "p", digits_data, {"long": RESNET_LONG})
    cache = root / "cache" / "digits"
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_TMPDIR=ray_tmp, RAY_ADDRESS="")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", "digits/long.yaml", "--parallel", "1"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = []
    watcher = _kill_when_checkpointed(cache, lambda pid: (workers.append(pid), proc.send_signal(signal.SIGINT)))
    out, err = proc.communicate(timeout=300)
    watcher.join(1)
    assert workers and proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    time.sleep(1)
    assert not Path(f"/proc/{workers[0]}").exists() or "zombie" in Path(f"/proc/{workers[0]}/status").read_text().lower()
    assert list(cache.glob(".partial-*/checkpoint.pth"))  # its checkpoint stays for the rerun
    again = ens("run", "digits/long.yaml", "--parallel", "1", cwd=root, env_extra={"RAY_TMPDIR": ray_tmp,
                                                                                    "RAY_ADDRESS": ""})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed (train epoch" in again.stdout


# ----------------------------------------------------------------------------------------------- ens tune
def test_a_parallel_tune_fills_the_same_study_a_sequential_one_resumes(ray_cluster, tmp_path, digits_data):
    """Trials on Ray Tune (OptunaSearch in ens's SQLite study, Tune's median stopping): as many finished trials as
    asked, each value what retraining its member gives; a later sequential call counts them and adds one more."""
    import torch
    from test_tune import SEARCH

    from pipelines.data import load_data, train_fraction
    from pipelines.train import train_member
    from pipelines.tune import trial_member, tune_member

    root = make_project(tmp_path / "p", digits_data, {"search": SEARCH.replace("pruner: none", "pruner: median")})
    import io

    from rich.console import Console
    from rich.progress import Progress

    rows = []
    with Progress(console=Console(file=io.StringIO())) as progress:  # the CLI's display (Tune pickles its state)
        r = tune_member(Project(root), "digits/search.yaml", "effnet", n_trials=4, parallel=Parallel(n=2),
                        on_trial=rows.append, progress=progress)
    assert r.ran == 4 and len(rows) == 4
    # what the driver showed as trials ended is what the study holds: state, epochs scored, last value
    assert sorted((t.number, t.state, t.epochs, t.value) for t in r.trials) == \
        sorted((t.number, t.state, t.epochs, t.value) for t in rows)
    assert all(t.value is not None and t.epochs == (2 if t.state == "complete" else 1) for t in r.trials)
    assert all(t.state in ("complete", "pruned") for t in r.trials) and len({t.params["lr"] for t in r.trials}) == 4
    best = r.best
    assert best.epochs == 2 and best.seconds > 0
    member = trial_member(r.member, r.tune, best.params)
    data = train_fraction(load_data(Project(root), r.competition), r.tune.fraction, r.member.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the trial's thread count (a task of the session cluster has 1 CPU)
    try:
        assert train_member(member, data).history[-1]["accuracy"] == pytest.approx(best.value, abs=1e-6)
    finally:
        torch.set_num_threads(threads)
    again = tune_member(Project(root), "digits/search.yaml", "effnet", n_trials=5)
    assert again.ran == 1 and len(again.trials) == 5 and again.study_name == r.study_name


def test_a_killed_trial_is_restored_from_its_checkpoint(ray_cluster, tmp_path, digits_data):
    import optuna
    from test_tune import SEARCH

    from pipelines.tune import tune_member

    search = SEARCH.replace("epochs: 2", "epochs: 5").replace("trials: 3", "trials: 1")
    root = make_project(tmp_path / "p", digits_data, {"search": search})
    folder = root / "cache" / "digits" / ".tune"
    killed = []

    def watch():
        end = time.time() + 240
        while time.time() < end and not killed:
            for ckpt in folder.glob("*/*/checkpoint.pth"):
                pid = int((ckpt.parent / "pid").read_text())
                killed.append(pid)
                os.kill(pid, signal.SIGKILL)
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    r = tune_member(Project(root), "digits/search.yaml", "effnet", parallel=Parallel(n=1))
    watcher.join(1)
    assert killed
    (trial,) = r.trials
    assert trial.state == "complete" and trial.epochs == 5  # every epoch scored, the first ones before the kill
    study = optuna.load_study(study_name=r.study_name, storage=f"sqlite:///{r.storage}")
    assert study.trials[0].user_attrs.get("resumed") is True


def test_dataloader_workers_inside_a_task_start_from_a_fork_server(ray_cluster, tmp_path, digits_data):
    """A forked DataLoader worker inside a Ray worker can hang: tasks start theirs by forkserver, which needs every
    piece of the loaders picklable by reference (ens's were local classes: 'Can't pickle local object')."""
    from pipelines.run import run_ensemble

    one = TINY.replace("num_workers: 0", "num_workers: 2").split("members:")[0] + \
        "members:\n  - {name: resnet, arch: test_resnet}\n"
    root = make_project(tmp_path / "p", digits_data, {"one": one})
    (outcome,) = run_ensemble(Project(root), "digits/one.yaml", parallel=Parallel(n=1)).members
    assert outcome.how == "trained" and outcome.entry.meta["metrics"]["plain_accuracy"] > 0.1
