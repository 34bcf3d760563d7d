"""Units of work (a member, a fold model) in parallel on Ray: `ens run --parallel N` and `--address`.

The driver (`run.gather_members`) does what a sequential run does — validate, data, keys, cache look-ups — and
hands only the missing units to `compute_on_ray`. Each becomes a Ray task (`compute_unit`) that re-reads the
config and the data from the project folder and runs the same train-and-predict path as a sequential run; its
cache entry is written to the project's cache by the task, and the driver reads it back by key: learners and
tensors never travel through Ray. Epoch and batch progress travels through a small actor (`Board`) that the driver
mirrors into its rich display.

Faults: a task whose worker or node dies is retried by Ray (`Parallel.retries`) and resumes from the member's last
epoch checkpoint in the project's cache; an error of ens's own (bad config, out of memory after ens's own halving)
is not retried and comes back as the one-line error it is in a sequential run. Ctrl-C cancels the tasks and leaves
their checkpoints for the rerun.

Threads: Ray sets OMP_NUM_THREADS to a task's `num_cpus`, and torch's results depend on its thread count, so every
task is given an explicit `num_cpus` and sets torch's threads to it (recorded in the entry's meta.json, with the
device and the worker).

ray is imported only here, and only when a run asks for it.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .errors import EnsError

RAY_HINT = "Ray is not installed: pip install 'ens[ray]' (or run without --parallel/--address)"
# environment variables a task on another node needs as the driver has them (ray forwards none by itself)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "ENS_PROJECT", "KAGGLE_CONFIG_DIR")


@dataclass
class Parallel:
    """How `ens run`/`ens tune` spread their work: `--parallel N` starts a local Ray cluster with N slots;
    `--address` (or RAY_ADDRESS) joins a running one (N then caps the tasks at once)."""

    n: int | None = None  # tasks at once (default with --address: every GPU slot, else one per node)
    address: str | None = None  # HOST:PORT or 'auto'
    gpus_per_member: float = 1.0  # on a cluster with GPUs: the share of a GPU each task gets
    cpus_per_member: int | None = None  # torch threads (and Ray CPUs) per task; default: the node's CPUs / slots
    retries: int = 3  # Ray's retries of a task whose worker or node died
    temp_dir: str | None = None  # a local cluster's Ray folder (sockets: keep the path short)

    def __post_init__(self):
        if self.n is not None and self.n < 1:
            raise EnsError(f"--parallel {self.n}: ask for at least one task at once")
        if self.gpus_per_member <= 0 or (self.gpus_per_member > 1 and self.gpus_per_member != int(self.gpus_per_member)):
            raise EnsError(f"--gpus-per-member {self.gpus_per_member}: give a share of one GPU (0.5, 0.25) or a "
                           "whole number of GPUs")
        if self.cpus_per_member is not None and self.cpus_per_member < 1:
            raise EnsError(f"--cpus-per-member {self.cpus_per_member}: give at least 1")


@dataclass
class Slots:
    """What each task asks Ray for, and how many run at once."""

    concurrent: int
    cpus: int  # Ray CPUs and torch threads per task
    gpus: float  # per task; 0 on a cluster without GPUs

    def describe(self) -> str:
        per = f"{self.cpus} CPU{'s' * (self.cpus > 1)}" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        return f"{self.concurrent} task{'s' * (self.concurrent > 1)} at once, {per} each"


def slots(nodes: list[dict], opts: Parallel) -> Slots:
    """The task shape for a cluster whose alive nodes have `nodes` resources ({'CPU': 4, 'GPU': 2}, ...): one
    task per GPU share where there are GPUs, else CPU slots; CPUs per task = the smallest such node's CPUs
    divided by the tasks it holds, unless `opts.cpus_per_member` says. Raises EnsError when no node can hold one
    task."""
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) > 0]
    if gpu_nodes:
        if opts.gpus_per_member > max(n["GPU"] for n in gpu_nodes):
            raise EnsError(f"--gpus-per-member {opts.gpus_per_member:g}: no node has that many GPUs (most: "
                           f"{max(n['GPU'] for n in gpu_nodes):g}); lower it")
        per_node = [int(n["GPU"] // opts.gpus_per_member) for n in gpu_nodes]
        total = sum(per_node)
        cpus = opts.cpus_per_member or max(1, min(int(n.get("CPU", 1)) // max(1, k)
                                                  for n, k in zip(gpu_nodes, per_node) if k))
        usable = [n for n in gpu_nodes if n.get("CPU", 0) >= cpus]
        gpus = opts.gpus_per_member
    else:
        cpu_nodes = [n for n in nodes if n.get("CPU", 0) >= 1]
        if not cpu_nodes:
            raise EnsError("the Ray cluster has no node with a CPU to train on; add a node")
        total = opts.n or len(cpu_nodes)
        per_node = math.ceil(total / len(cpu_nodes))
        cpus = opts.cpus_per_member or max(1, min(int(n["CPU"]) for n in cpu_nodes) // per_node)
        usable = [n for n in cpu_nodes if n["CPU"] >= cpus]
        gpus = 0.0
    if not usable:
        raise EnsError(f"--cpus-per-member {cpus}: no node of the Ray cluster has {cpus} CPUs "
                       f"(most: {max(int(n.get('CPU', 0)) for n in nodes)}); lower it")
    concurrent = min(opts.n or total, total) if gpu_nodes else total
    return Slots(max(1, concurrent), cpus, gpus)


# ----------------------------------------------------------------------------------------------- the cluster
def _ray():
    try:
        import ray
    except ImportError:
        raise EnsError(RAY_HINT) from None
    return ray


def local_cpus() -> int:
    from .accel import available_cores

    return available_cores()


class Connection:
    """A Ray cluster for the length of a `with`: a new local one (`--parallel N`), or a running one
    (`--address`, RAY_ADDRESS); a cluster this process started is shut down on exit, a joined one is left."""

    def __init__(self, opts: Parallel):
        self.opts, self.started = opts, False

    def __enter__(self):
        ray = _ray()
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        address = self.opts.address or os.environ.get("RAY_ADDRESS")
        env = {"env_vars": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}}
        quiet = dict(include_dashboard=False, log_to_driver=False, configure_logging=True, logging_level="ERROR")
        if ray.is_initialized():  # a caller's own cluster (tests, a notebook): used as it is
            return self
        try:
            if address:
                ray.init(address=address, runtime_env=env, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
            else:
                n = self.opts.n or 1
                cpus = max(local_cpus(), n * (self.opts.cpus_per_member or 1))
                ray.init(num_cpus=cpus, runtime_env=env, _temp_dir=self.opts.temp_dir, **quiet)
                self.started = True
        except ConnectionError as e:
            raise EnsError(f"--address {address}: no Ray cluster answers there ({str(e).splitlines()[0]}); start one "
                           "with `ray start --head`, or use --parallel N for a local one") from None
        return self

    def __exit__(self, *exc):
        if self.started:
            _ray().shutdown()

    def slots(self) -> Slots:
        ray = _ray()
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return slots(nodes, self.opts)


# ----------------------------------------------------------------------------------------------- progress
class Board:
    """The actor tasks post their progress events to; the driver drains it a few times a second."""

    def __init__(self):
        self.events: list = []

    def post(self, events: list) -> None:
        self.events.extend(events)

    def drain(self) -> list:
        out, self.events = self.events, []
        return out


class RemoteProgress:
    """What a task hands to train/predict as `progress`: the slice of rich's Progress they use, forwarded to the
    driver through the Board. Batch advances are summed and sent at most every `every` seconds."""

    def __init__(self, board, label: str, every: float = 0.5):
        self.board, self.label, self.every = board, label, every
        self._next, self._live, self._pending, self._advance, self._sent = 0, set(), [], {}, 0.0
        self.console = self  # `say(progress)` prints through progress.console.print

    # rich.Progress's methods, as train.py, predict.py and tune.py call them
    def add_task(self, description: str, total=None, **_):
        self._next += 1
        self._live.add(self._next)
        self._send(("add", self._next, description, total), now=True)
        return self._next

    def update(self, task, **fields):
        self._send(("update", task, fields))

    def reset(self, task, **fields):
        self._advance.pop(task, None)
        self._send(("reset", task, fields), now=True)

    def advance(self, task, amount: float = 1):
        self._advance[task] = self._advance.get(task, 0) + amount
        self._send(None)

    def remove_task(self, task):
        self._live.discard(task)
        self._advance.pop(task, None)
        self._send(("remove", task), now=True)

    @property
    def task_ids(self):
        return list(self._live)

    def print(self, text, *args, **kwargs):
        self._send(("say", str(text)), now=True)

    def _send(self, event, now: bool = False):
        if event is not None:
            self._pending.append(event)
        if now or time.monotonic() - self._sent >= self.every:
            self.flush()

    def flush(self, wait: bool = False):
        """Send what is pending; with `wait`, once the Board holds it (a task's last words before it returns)."""
        events = self._pending + [("advance", t, n) for t, n in self._advance.items()]
        self._pending, self._advance, self._sent = [], {}, time.monotonic()
        if events:
            posted = self.board.post.remote([(self.label, *e) for e in events])
            if wait:
                import ray

                ray.get(posted)


class Mirror:
    """The driver's side: each task's bars shown in the driver's rich display, named by the task's label."""

    def __init__(self, progress):
        self.progress, self.ids = progress, {}

    def apply(self, events: list) -> None:
        from .util import say

        for label, kind, *rest in events:
            if kind == "say":
                say(self.progress)(rest[0] if rest[0].startswith(label.split()[0]) else f"{label}: {rest[0]}")
            elif self.progress is None:
                continue
            elif kind == "add":
                local, description, total = rest
                self.ids[label, local] = self.progress.add_task(self._name(label, description), total=total)
            elif (label, rest[0]) not in self.ids:
                continue  # a bar of an attempt that died, or one removed already
            elif kind == "remove":
                self.progress.remove_task(self.ids.pop((label, rest[0])))
            elif kind == "advance":
                self.progress.advance(self.ids[label, rest[0]], rest[1])
            else:  # update, reset
                fields = dict(rest[1])
                if "description" in fields:
                    fields["description"] = self._name(label, fields["description"])
                getattr(self.progress, kind)(self.ids[label, rest[0]], **fields)

    def forget(self, label: str) -> None:
        """Remove the bars a task left (it died, or was cancelled)."""
        for key in [k for k in self.ids if k[0] == label]:
            if self.progress is not None:
                self.progress.remove_task(self.ids.pop(key))

    @staticmethod
    def _name(label: str, description: str) -> str:
        return f"  {label}: {description.strip()}"


# ----------------------------------------------------------------------------------------------- dispatch
@dataclass
class Unit:
    """One task: `fn(*args, progress=RemoteProgress, slots=Slots)` run in a Ray worker; `label` names it."""

    label: str
    fn: Callable
    args: tuple
    result: object = None
    starts: list = field(default_factory=list)  # each attempt's worker: {host, pid, node, gpus}


def run_units(conn: Connection, units: list[Unit], progress=None, on_done: Callable[[Unit], None] = lambda u: None,
              on_start: Callable[[Unit, dict], None] = lambda u, w: None) -> Slots:
    """Run `units` as Ray tasks, at most `slots.concurrent` at once, calling `on_done(unit)` as each finishes
    (`unit.result` set). The first error of ens's own cancels the rest and is raised as it was raised in the task;
    a task whose worker died more than `retries` times ends the run with a one-line error. Ctrl-C cancels every
    task (their checkpoints stay) and is raised."""
    ray = _ray()
    shape = conn.slots()
    board = _board(ray)
    mirror = Mirror(progress)
    pending, running = deque(units), {}
    task = ray.remote(_task)
    try:
        while pending or running:
            while pending and len(running) < shape.concurrent:
                unit = pending.popleft()
                ref = task.options(num_cpus=shape.cpus, num_gpus=shape.gpus, max_retries=conn.opts.retries,
                                   retry_exceptions=False, name=unit.label).remote(unit.fn, unit.args, board,
                                                                                    unit.label, shape)
                running[ref] = unit
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.25)
            _drain(ray, board, mirror, units, on_start)
            for ref in ready:
                unit = running.pop(ref)
                try:
                    unit.result = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    raise _cause(e) from None
                except ray.exceptions.RayError as e:  # the worker or its node died, retries exhausted
                    raise EnsError(f"{unit.label}: its Ray worker died {len(unit.starts)} time(s) "
                                   f"({type(e).__name__}: {str(e).splitlines()[0][:160]}); run again: it resumes "
                                   "from its last epoch checkpoint") from None
                _drain(ray, board, mirror, units, on_start)
                mirror.forget(unit.label)
                on_done(unit)
    except BaseException:
        for ref in running:
            ray.cancel(ref, force=True)  # kills the workers: their locks go, their checkpoints stay
        raise
    finally:
        for unit in units:
            mirror.forget(unit.label)
        ray.kill(board)
    return shape


def _board(ray):
    """The progress actor, on the driver's node where it has one (a lost worker node must not take it along), and
    restarted by Ray if it dies all the same (its handle stays valid; undrained events are lost)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(Board).options(
        scheduling_strategy=here).remote()


def _drain(ray, board, mirror: Mirror, units: list[Unit], on_start) -> None:
    try:
        events = ray.get(board.drain.remote())
    except ray.exceptions.RayActorError:  # the Board's node died: Ray restarts it; these events are lost
        return
    by_label = {u.label: u for u in units}
    shown = []
    for event in events:
        label, kind, *rest = event
        if kind == "start":  # a new attempt: the bars of a dead one go
            unit = by_label[label]
            if unit.starts:
                mirror.forget(label)
            unit.starts.append(rest[0])
            on_start(unit, rest[0])
        else:
            shown.append(event)
    mirror.apply(shown)


def _cause(error) -> BaseException:
    """The exception a task raised, as it was raised there (ens's EnsError keeps its one line)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


def prepare_worker(cpus: int) -> None:
    """A Ray worker about to train (a member's task, a tuning trial): torch's threads set to its CPUs (not left to
    OMP_NUM_THREADS), and DataLoader workers started from a fork server (a fork of a Ray worker, with its threads,
    can hang) that has fastai and ens's loader classes imported once: each epoch's workers fork from it at once
    instead of importing torch and fastai again."""
    import multiprocessing

    import torch

    torch.set_num_threads(cpus)
    multiprocessing.set_start_method("forkserver", force=True)
    multiprocessing.set_forkserver_preload(["pipelines.data.fastai_parts"])


def _task(fn, args, board, label: str, shape: Slots):
    """Inside the Ray worker: `prepare_worker` (threads recorded in the worker's description), then `fn`."""
    import socket

    import ray

    prepare_worker(shape.cpus)
    worker = {"host": socket.gethostname(), "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
              "gpus": [str(g) for g in ray.get_gpu_ids()], "cpus": shape.cpus}
    ray.get(board.post.remote([(label, "start", worker)]))  # held before the task can end: the driver counts attempts
    progress = RemoteProgress(board, label)
    try:
        return fn(*args, progress=progress, worker=worker)
    finally:
        progress.flush(wait=True)


