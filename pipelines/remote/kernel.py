"""What runs in the training notebook on Kaggle (the generated script calls `main`): a project folder made from the
dataset's YAMLs with the competition's data where Kaggle mounts it; each unit's keys recomputed on that data and
this machine's precision and libraries, a unit whose keys differ from the ones sent refused with what differs;
the rest trained through `unit.member_entry`, each finished entry zipped into the output as it ends, each epoch's
checkpoint too; the notebook ends itself before its deadline. `ens-run.json` in the output says it all."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from ..errors import EnsError
from .bundle import STATUS, zip_folder
from .gpus import GPUS


class Status:
    """ens-run.json: the GPU this notebook got, and each unit's state (pending, training, done, refused, failed,
    out of time), its output file and checksum; rewritten atomically at every change."""

    def __init__(self, out: Path, manifest: dict):
        self.path, self.lock = out / STATUS, threading.Lock()
        self.data = {"content": manifest["content"], "gpu": gpu_facts(), "started": time.time(), "finished": False,
                     "versions": _versions(), "units": {u["key"]: {"label": u["label"], "state": "pending"}
                                                       for u in manifest["units"]}}
        self.write()

    frozen = False  # set by the watchdog: a lane whose process it stopped does not then write 'failed'

    def unit(self, key: str, force: bool = False, **fields) -> None:
        with self.lock:
            if force or not self.frozen:
                self.data["units"][key].update(fields)
                self._write()

    def write(self, force: bool = False, **fields) -> None:
        with self.lock:
            if force or not self.frozen:
                self.data.update(fields)
                self._write()

    def freeze(self) -> None:
        with self.lock:
            self.frozen = True

    def _write(self) -> None:
        tmp = self.path.with_name(f".{STATUS}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def gpu_facts() -> dict:
    """The cards this notebook got (Kaggle does not always honour the kind asked for)."""
    import torch

    if not torch.cuda.is_available():
        return {"name": "none", "count": 0}
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}


def _versions() -> dict:
    from ..models import package_version

    return {n: package_version(n) for n in ("torch", "torchvision", "timm", "fastai", "numpy")}


def find_data(comp: dict, input_root: Path) -> Path:
    """The competition's folder under /kaggle/input: <slug>/, else any folder up to three levels down holding the
    test folder and the sample submission (Kaggle's mount paths have changed)."""
    slug = comp.get("kaggle") or comp["name"]
    candidates = [input_root / slug, input_root / "competitions" / slug, *sorted(input_root.glob("*")),
                  *sorted(input_root.glob("*/*")), *sorted(input_root.glob("*/*/*"))]
    for folder in candidates:
        if (folder / comp["test_images"]).is_dir() and (folder / comp["sample_submission"]).is_file():
            return folder
    raise EnsError(f"no folder under {input_root} holds {comp['test_images']}/ and {comp['sample_submission']}: "
                   f"the notebook needs the competition '{slug}' as its input")


def write_project(work: Path, manifest: dict, input_root: Path) -> Path:
    """competitions/<name>.yaml (data where Kaggle mounts it) and the ensemble's YAML (overrides applied)."""
    comp = dict(manifest["competition"], data_dir=str(find_data(manifest["competition"], input_root)))
    (work / "competitions").mkdir(parents=True, exist_ok=True)
    (work / "competitions" / f"{comp['name']}.yaml").write_text(yaml.safe_dump(comp))
    ensemble = work / manifest["ensemble_file"]
    ensemble.parent.mkdir(parents=True, exist_ok=True)
    ensemble.write_text(yaml.safe_dump(manifest["ensemble"]))
    return work


def differences(sent: dict, here: dict, versions_sent: dict, versions_here: dict) -> list[str]:
    """What makes a unit's training key here differ from the one sent: data, precision, architecture (with the
    library versions that resolve it), other training fields, cache format."""
    out = []
    if sent["data"] != here["data"]:
        out.append(f"data fingerprint {here['data'][:12]} here, {sent['data'][:12]} sent (Kaggle's copy of the "
                   "competition's files, labels or split differs)")
    a, b = sent["member"], here["member"]
    if a.get("precision") != b.get("precision"):
        out.append(f"precision {b.get('precision')} here, {a.get('precision')} planned (another device: set the "
                   "member's precision, or choose the --on kaggle kind this notebook gets)")
    if a.get("arch") != b.get("arch"):
        libs = ", ".join(f"{n} {versions_here.get(n)} here, {versions_sent.get(n)} sent" for n in ("timm", "torchvision")
                         if versions_here.get(n) != versions_sent.get(n))
        out.append(f"architecture resolves to {b.get('arch')} here, {a.get('arch')} sent" + (f" ({libs})" if libs else ""))
    other = sorted(k for k in set(a) | set(b) if k not in ("precision", "arch") and a.get(k) != b.get(k))
    if other:
        out.append(f"training fields {', '.join(other)} differ (ens {versions_here.get('ens')} here)")
    if sent.get("format") != here.get("format"):
        out.append(f"cache format {here.get('format')} here, {sent.get('format')} sent (another ens)")
    return out or ["the keys differ"]


class Mirror(threading.Thread):
    """Copies a unit's per-epoch checkpoint into the output whenever training writes a new one: what Kaggle keeps
    when a notebook is stopped is not documented, so the output always holds the last finished epoch."""

    def __init__(self, folder: Path, dest: Path, every: float = 1.0):
        super().__init__(daemon=True)
        self.folder, self.dest, self.every = folder, dest, every
        self.stop, self.seen, self.lock = threading.Event(), None, threading.Lock()

    def sync(self) -> bool:
        with self.lock:  # the mirror's thread and the watchdog (or a failing lane) write the same archive
            try:
                sig = [(p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(self.folder.iterdir())]
            except OSError:
                return False
            if sig and sig != self.seen:
                zip_folder(self.folder, self.dest)
                self.seen = sig
                return True
            return False

    def run(self) -> None:
        while not self.stop.wait(self.every):
            self.sync()


def main(manifest_path: str, root: str) -> None:
    try:
        train_units(Path(manifest_path), Path(root))
    except EnsError as e:
        print(f"ens error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def lanes(planned: int, gpu: dict) -> int:
    """Units trained at once: one per card the notebook got, at most the cards planned (two T4s: two). A notebook
    without a card trains one at a time; ENS_KAGGLE_LANES sets the number (the fake Kaggle's CPU notebooks)."""
    forced = os.environ.get("ENS_KAGGLE_LANES")
    if forced:
        if not forced.strip().isdigit():
            raise EnsError(f"ENS_KAGGLE_LANES={forced!r}: give a whole number of units to train at once")
        return max(1, int(forced))
    return max(1, min(planned, gpu.get("count") or 0))


class _Notebook:
    """What every unit of one notebook shares: the project rebuilt on Kaggle's data, the status, the output."""

    def __init__(self, manifest_path: Path, root: Path, work: Path | None = None):
        from ..cache import MemberCache
        from ..config import Project, load_ensemble
        from ..data import load_data
        from ..unit import fold_variants

        self.manifest_path, self.root = manifest_path, root
        self.manifest = json.loads(manifest_path.read_text())
        self.out = root / "working"
        self.work = work or Path(os.environ.get("ENS_KAGGLE_WORK") or tempfile.mkdtemp(prefix="ens-work-"))
        if work is None:
            write_project(self.work, self.manifest, root / "input")
        self.project = Project(self.work)
        _, self.ens, comp = load_ensemble(self.project, str(self.project.root / self.manifest["ensemble_file"]))
        self.variants, _ = fold_variants(self.ens, load_data(self.project, comp), None, self.manifest["ensemble_file"])
        self.cache = MemberCache(self.project.cache, comp.name)

    def resolve(self, u: dict):
        """(member, fold data) of a unit sent, or (None, None) when the YAML has no such member or fold."""
        member = next((m for m in self.ens.members if m.name == u["member"]), None)
        d = next((d for f, d, _ in self.variants if f == u["fold"]), None)
        return (member, d) if member is not None and d is not None else (None, None)


def train_units(manifest_path: Path, root: Path) -> dict:
    """Check and train the manifest's units, as many at once as the notebook has cards (`lanes`); the status
    written to the output as it goes."""
    from ..cache import train_key, train_key_fields

    manifest = json.loads(manifest_path.read_text())
    out = root / "working"
    out.mkdir(parents=True, exist_ok=True)
    status = Status(out, manifest)
    training = Training()
    _watchdog(status.data["started"] + manifest["seconds"], status, training, out)
    nb = _Notebook(manifest_path, root)
    here_versions = dict(status.data["versions"], ens=manifest["ens"])
    n_lanes = lanes(GPUS[manifest["gpu"]].lanes if manifest["gpu"] in GPUS else 1, status.data["gpu"])
    status.write(lanes=n_lanes)
    print(f"ens {manifest['ens']}: {len(manifest['units'])} unit(s) on {status.data['gpu']['name']} "
          f"(asked for {manifest['gpu']}), {n_lanes} at once", flush=True)
    accepted = []
    for u in manifest["units"]:
        member, d = nb.resolve(u)
        if member is None:
            status.unit(u["key"], state="refused", reason=f"no member {u['member']} or fold {u['fold']} in the YAML")
            continue
        if train_key(member, d.fingerprint) != u["train"]:
            fields = train_key_fields(member, d.fingerprint)
            reason = "; ".join(differences(u["parts"], fields, manifest["versions"], here_versions))
            print(f"ens: {u['label']} refused: {reason}", flush=True)
            status.unit(u["key"], state="refused", reason=reason)
            continue
        accepted.append((u, member, d))
    worker = {"host": "kaggle", "gpu": status.data["gpu"], "gpu_kind": manifest["gpu"], "pid": os.getpid()}
    if n_lanes == 1:
        for u, member, d in accepted:
            _run_unit(nb, status, training, u, lambda u=u, m=member, d=d: _in_process(nb, u, m, d, worker))
    else:
        _run_lanes(nb, status, training, [u for u, _, _ in accepted], n_lanes, worker)
    if training.stopped:  # the watchdog is writing the status: it ends the notebook
        threading.Event().wait()
    status.write(finished=True, ended=time.time())
    return status.data


class Training:
    """The units being trained now, shared by the lanes and the watchdog: once the deadline has come (`stop`), no
    unit and no process starts, and every process started is killed."""

    def __init__(self):
        self.lock, self.held, self.stopped = threading.Lock(), {}, False

    def start(self, u: dict, mirror: Mirror) -> bool:
        with self.lock:
            if not self.stopped:
                self.held[u["key"]] = {"unit": u, "mirror": mirror}
            return not self.stopped

    def spawn(self, key: str, popen):
        """`popen()`'s process, or None once stopped; under the lock the watchdog kills with."""
        with self.lock:
            if self.stopped:
                return None
            self.held[key]["proc"] = proc = popen()
            return proc

    def done(self, key: str, fields: dict) -> None:
        with self.lock:
            self.held[key]["done"] = fields

    def end(self, key: str) -> None:
        with self.lock:
            self.held.pop(key, None)

    def stop(self) -> list[dict]:
        with self.lock:
            self.stopped = True
            for held in self.held.values():
                if held.get("proc") is not None:
                    held["proc"].kill()
            return list(self.held.values())


def _run_lanes(nb: _Notebook, status: Status, training: Training, units: list[dict], n: int, worker: dict) -> None:
    """`n` threads, one per card, each taking the next unit (longest first, as planned) and training it in a
    process that sees only its card (CUDA_VISIBLE_DEVICES): two fastai runs never share a process or a GPU."""
    todo = list(units)
    take = threading.Lock()

    def lane(i: int) -> None:
        while not training.stopped:
            with take:
                if not todo:
                    return
                u = todo.pop(0)
            _run_unit(nb, status, training, u, lambda: _in_child(nb, u, i, dict(worker, lane=i), training), lane=i)

    threads = [threading.Thread(target=lane, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _run_unit(nb: _Notebook, status: Status, training: Training, u: dict, train, lane: int = 0) -> None:
    """One unit: resumed from a checkpoint the dataset carries, its checkpoints mirrored into the output while
    `train()` runs, its entry zipped into the output when done. Any failure (training, a damaged checkpoint, a
    full output disk) is reported with the unit's last checkpoint, and the others go on; after the deadline the
    watchdog speaks for the unit."""
    partial_out = nb.out / f"ens-partial-{u['train']}.zip"
    mirror = Mirror(nb.cache.partial(u["train"]), partial_out)
    start = time.time()
    try:
        _restore_partial(nb.manifest, nb.manifest_path.parent, nb.cache, u["train"])
        if not training.start(u, mirror):
            return
        mirror.start()
        status.unit(u["key"], state="training", started=start, lane=lane)
        entry, how = train()
        mirror.stop.set()
        mirror.join()
        name = _write_unit(nb.cache, entry, u, nb.out)
        done = {"how": how, "file": name, "sha256": _sha256(nb.out / name), "seconds": round(time.time() - start, 1)}
        training.done(u["key"], done)
        status.unit(u["key"], state="done", **done)
        partial_out.unlink(missing_ok=True)
        print(f"ens: {u['label']} {how} in {time.time() - start:.0f} s -> {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - one unit's failure is reported; the others still train
        if training.stopped:
            return
        mirror.stop.set()
        mirror.sync()
        status.unit(u["key"], state="failed", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                    partial=partial_out.name if partial_out.exists() else None)
        print(f"ens: {u['label']} failed: {e}", file=sys.stderr, flush=True)
    finally:
        training.end(u["key"])


def _in_process(nb: _Notebook, u: dict, member, d, worker: dict):
    from ..unit import member_entry

    return member_entry(member, d, nb.cache, u["train"], u["key"], None, worker)


class UnitFailed(Exception):
    pass


def _in_child(nb: _Notebook, u: dict, lane: int, worker: dict, training: Training):
    """The unit trained by `python -c ...train_one` on card `lane` (the notebook's sys.path, which holds the
    dataset's wheels, passed as PYTHONPATH); its entry read from the shared cache when the process ends."""
    import subprocess

    result = nb.work / f".lane-{u['key']}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(lane), ENS_KAGGLE_WORK=str(nb.work),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    code = "import sys; from pipelines.remote.kernel import train_one; train_one(*sys.argv[1:])"
    proc = training.spawn(u["key"], lambda: subprocess.Popen(
        [sys.executable, "-c", code, str(nb.manifest_path), str(nb.root), u["key"], json.dumps(worker)], env=env))
    if proc is None:
        raise UnitFailed("the notebook's deadline came before it started")
    rc = proc.wait()
    told = json.loads(result.read_text()) if result.is_file() else {}
    if rc != 0 or "how" not in told:
        raise UnitFailed(told.get("error") or f"its training process (card {lane}) ended with code {rc}")
    entry = nb.cache.load(u["key"])
    if entry is None:
        raise UnitFailed(f"its training process (card {lane}) ended without a cache entry")
    return entry, told["how"]


def train_one(manifest_path: str, root: str, key: str, worker: str) -> None:
    """A lane's process: one unit of the manifest trained into the notebook's cache (ENS_KAGGLE_WORK); how it
    went in .lane-<key>.json there."""
    from ..unit import member_entry

    nb = _Notebook(Path(manifest_path), Path(root), Path(os.environ["ENS_KAGGLE_WORK"]))
    u = next(u for u in nb.manifest["units"] if u["key"] == key)
    member, d = nb.resolve(u)
    result = nb.work / f".lane-{key}.json"
    try:
        worker = dict(json.loads(worker), pid=os.getpid(), gpu=gpu_facts())  # the card this process sees
        _, how = member_entry(member, d, nb.cache, u["train"], key, None, worker)
    except Exception as e:
        result.write_text(json.dumps({"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}))
        raise
    result.write_text(json.dumps({"how": how}))


def _watchdog(deadline: float, status: Status, training: Training, out: Path) -> None:
    """At the notebook's own deadline (before Kaggle's limit): no unit starts any more, the lanes' processes are
    killed, a unit whose archive is written is 'done', the others keep their last epoch's checkpoints in the
    output and are 'out of time'; the notebook ends (exit 0: what it wrote stays)."""

    def stop() -> None:
        at_deadline(status, training, out)
        os._exit(0)

    timer = threading.Timer(max(0.0, deadline - time.time()), stop)
    timer.daemon = True
    timer.start()


def at_deadline(status: Status, training: Training, out: Path) -> None:
    """The watchdog's work before the notebook ends: the status frozen, then written for each unit in hand."""
    status.freeze()
    for held in training.stop():
        u, mirror = held["unit"], held["mirror"]
        mirror.stop.set()
        archive = out / f"ens-unit-{u['key']}.zip"
        started = status.data["units"][u["key"]].get("started") or time.time()
        done = held.get("done") or ({"file": archive.name, "sha256": _sha256(archive),
                                     "seconds": round(time.time() - started, 1)} if archive.is_file() else None)
        if done:
            status.unit(u["key"], force=True, state="done", **done)
            continue
        mirror.sync()
        status.unit(u["key"], force=True, state="out of time",
                    partial=mirror.dest.name if mirror.dest.exists() else None)
    status.write(force=True, finished=True, ended=time.time(), out_of_time=True)
    print("ens: the notebook's deadline has come; its checkpoints are in the output", flush=True)


def _restore_partial(manifest: dict, folder: Path, cache, train: str) -> None:
    """A unit stopped by an earlier notebook's limit resumes from the checkpoint the dataset carries."""
    from ..kaggle.extract import safe_extract

    partial = (manifest.get("partials") or {}).get(train)
    if partial and not cache.partial(train).is_dir():
        cache.root.mkdir(parents=True, exist_ok=True)
        safe_extract(folder / partial["file"], cache.partial(train))
        print(f"ens: resuming {train} from the checkpoint of an earlier notebook", flush=True)


def _write_unit(cache, entry, u: dict, out: Path) -> str:
    """The entry (and its kept weights) as one archive in the output: entry/..., model/..."""
    import zipfile

    name = f"ens-unit-{u['key']}.zip"
    tmp = out / f".{name}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(entry.path.iterdir()):
            z.write(p, f"entry/{p.name}")
        model = cache.model_dir(u["train"])
        if model.is_dir():
            for p in sorted(model.iterdir()):
                z.write(p, f"model/{p.name}")
    os.replace(tmp, out / name)
    return name


def _sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
