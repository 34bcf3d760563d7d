"""`ens run --on kaggle` on this side: the units not cached (and not already in a running notebook) planned into
notebooks by estimated time, each sent as a dataset and a script kernel, followed with back-off (Ctrl-C detaches),
its output fetched and verified into the cache. Every notebook and its units are a row of
submissions/<competition>/kaggle-runs.csv (under the history's lock), so nothing is sent twice by accident and
`ens kaggle status` carries on where a run stopped following."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from .. import kaggle
from ..cache import MemberCache
from ..config import Competition, Project
from ..errors import EnsError
from ..submission import Interrupted, read_history
from ..util import file_lock, unique_suffix
from . import bundle as bundles
from .entries import Refused, import_partial, import_unit
from .gpus import GPUS, Target

RUNS = "kaggle-runs.csv"
RUNNING = "running"
FINISHED = ("complete", "error", "cancel_acknowledged")
MARGIN = 0.15          # of the session limit: the notebook's own deadline comes this much before Kaggle's
OVERHEAD = 180.0       # seconds per notebook: start, pip-free imports, the data's fingerprint, writing outputs
UNIT_OVERHEAD = 30.0   # seconds per unit: building loaders, predicting with TTA


COLUMNS = ["id", "time", "ensemble", "notebook", "version", "dataset", "gpu", "internet", "status", "units",
           "estimate_s", "work", "got_gpu", "seconds", "rate", "versions", "note"]


def _lock(table: Path):
    return file_lock(table.with_name(f".{table.name}.lock"))


def _write(table: Path, rows: list[dict]) -> None:
    """The whole table, atomically (hold the lock)."""
    import csv

    table.parent.mkdir(parents=True, exist_ok=True)
    tmp = table.with_name(table.name + unique_suffix())
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows({k: row.get(k) or "" for k in COLUMNS} for row in rows)
        tmp.replace(table)
    finally:
        tmp.unlink(missing_ok=True)


def append_history(table: Path, **row) -> str:
    """A new row of the runs table; its id."""
    import uuid
    from datetime import datetime, timezone

    row.setdefault("id", uuid.uuid4().hex[:12])
    row.setdefault("time", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    with _lock(table):
        _write(table, read_history(table) + [row])
    return row["id"]


def update_history(table: Path, row_id: str, **fields) -> None:
    with _lock(table):
        rows = read_history(table)
        for row in rows:
            if row.get("id") == row_id:
                row.update(fields)
        _write(table, rows)


class Pending(EnsError):
    """Units still training on Kaggle when ens stopped following (--no-wait): not an error."""

    exit_code = 0


@dataclass
class Sent:
    label: str
    member: object
    fold: object
    train: str
    key: str
    images: int  # training images of the unit (its data)

    def as_dict(self, parts: dict) -> dict:
        return {"label": self.label, "member": self.member.name, "fold": self.fold, "train": self.train,
                "key": self.key, "parts": parts}


def runs_path(project: Project, comp: Competition) -> Path:
    return project.submissions / comp.name / RUNS


def _area(size) -> float:
    return (size[0] * size[1]) if isinstance(size, (tuple, list)) else size * size


def work(u: Sent) -> float:
    """A unit's work in image-epochs at 224 px (the unit a rate is measured in)."""
    return u.images * u.member.total_epochs * _area(u.member.final_size) / 224 ** 2


def measured_rate(project: Project, comp: Competition, kind: str) -> float | None:
    """Seconds per image-epoch at 224 px measured by earlier notebooks of this kind (the median), or None."""
    rates = sorted(float(r["rate"]) for r in read_history(runs_path(project, comp))
                   if r.get("gpu") == kind and r.get("rate"))
    return rates[len(rates) // 2] if rates else None


def plan(units: list[Sent], rate: float, hours: float, lanes: int = 1) -> list[list[Sent]]:
    """Units into notebooks (first fit, longest first) so that each card of each notebook ends by its deadline;
    a unit longer than a whole notebook takes a card to itself (it stops at the deadline and resumes in the next
    notebook from its checkpoints) while the other cards take units that end by then."""
    deadline = hours * 3600 * (1 - MARGIN)
    groups: list[list[Sent]] = []
    for u in sorted(units, key=lambda u: -work(u)):
        fit = next((g for g in groups if _fits(g + [u], rate, lanes, deadline)), None)
        if fit is None:
            groups.append([u])
        else:
            fit.append(u)
    return groups


def _cards(units: list[Sent], rate: float, lanes: int) -> list[list[float]]:
    """Each card's units' seconds, as the notebook's lanes take them: the next unit in the order sent (longest
    first) to the card that is free first."""
    cards: list[list[float]] = [[] for _ in range(max(1, lanes))]
    for u in units:
        min(cards, key=sum).append(work(u) * rate + UNIT_OVERHEAD)
    return cards


def _fits(units: list[Sent], rate: float, lanes: int, deadline: float) -> bool:
    return all(OVERHEAD + sum(card) <= deadline or len(card) == 1 for card in _cards(units, rate, lanes))


def estimate(units: list[Sent], rate: float, lanes: int = 1) -> float:
    """A notebook's seconds: its overhead, then its units on `lanes` cards; the time the last card ends."""
    return OVERHEAD + max(sum(card) for card in _cards(units, rate, lanes))


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def _quota(say) -> None:
    """The weekly GPU quota left, where Kaggle reports it (said before anything is pushed)."""
    try:
        q = kaggle.gpu_quota()
    except kaggle.KaggleError as e:
        say(f"Kaggle did not report your weekly GPU quota ({e.reason})")
        return
    if q.get("allowed"):
        say(f"weekly GPU quota: {q['used']:.1f} h of {q['allowed']:.1f} h used (refreshes {q.get('refresh')})")


class Remote:
    """One `ens run --on kaggle`: the project, competition, ensemble (path, overrides), target and how it speaks."""

    def __init__(self, project: Project, comp: Competition, path: Path, overrides: list[str], target: Target,
                 say=print, hours: float | None = None, first_poll: float = 10.0):
        if not comp.kaggle:
            raise EnsError(f"competitions/{comp.name}.yaml has no `kaggle:` slug: a Kaggle notebook reads the "
                           "competition's data from Kaggle; set it, or train here (without --on kaggle)")
        self.project, self.comp, self.path, self.overrides, self.target = project, comp, path, overrides, target
        self.say, self.first_poll = say, first_poll
        self.hours = hours or target.gpu.session_hours
        self.lanes = target.gpu.lanes
        self.cache = MemberCache(project.cache, comp.name)
        self.table = runs_path(project, comp)

    # -- sending ------------------------------------------------------------------------------------------------
    def in_flight(self) -> dict[str, dict]:
        """key -> the running notebook's row, for every unit of a notebook not yet fetched."""
        return {u["key"]: row for row in read_history(self.table) if row.get("status") == RUNNING
                for u in json.loads(row.get("units") or "[]")}

    def send(self, units: list[Sent], parts: dict[str, dict]) -> list[dict]:
        """Push notebooks for the units not already in one; the rows of every running notebook holding any of
        `units` (those just pushed included). Under a lock: two runs at once never send a unit twice."""
        with file_lock(self.table.with_name(f".{RUNS}.send.lock")):
            flight = self.in_flight()
            new = [u for u in units if u.key not in flight]
            if len(new) < len(units):
                names = sorted({flight[u.key]["notebook"] for u in units if u.key in flight})
                self.say(f"{len(units) - len(new)} unit(s) already train in {', '.join(names)}: not sent again")
            if new:
                rate = measured_rate(self.project, self.comp, self.target.gpu.kind)
                basis = "measured on earlier notebooks" if rate else "a stated estimate, not yet measured"
                rate = rate or self.target.gpu.seconds_per_image_epoch
                groups = plan(new, rate, self.hours, self.lanes)
                at_once = f", {self.lanes} at once" if self.lanes > 1 else ""
                self.say(f"{len(new)} unit(s) to train on Kaggle ({self.target.gpu.kind}) in {len(groups)} "
                         f"notebook(s){at_once}, about {sum(estimate(g, rate, self.lanes) for g in groups) / 3600:.2f}"
                         f" GPU hours ({rate:.4f} s per image-epoch at 224 px: {basis})")
                _quota(self.say)
                owner = kaggle.whoami()
                for group in groups:
                    self._push(group, parts, owner, estimate(group, rate, self.lanes))
            return [row for row in read_history(self.table) if row.get("status") == RUNNING
                    and {u["key"] for u in json.loads(row["units"])} & {u.key for u in units}]

    def _push(self, group: list[Sent], parts: dict[str, dict], owner: str, seconds: float) -> None:
        deadline = self.hours * 3600 * (1 - MARGIN)
        b = bundles.build(self.project, self.comp, self.path, self.overrides,
                          [u.as_dict(parts[u.key]) for u in group], self.target, deadline)
        dataset_slug, kernel_slug = bundles.slugs(self.comp, b.content)
        dataset = f"{owner}/{dataset_slug}"
        self._upload(b, dataset)
        kernel_dir = b.folder.parent / "kernel"
        bundles.write_kernel(kernel_dir, self.comp, b, owner, self.target, self.path.stem)
        pushed = kaggle.push_kernel(kernel_dir, session_seconds=int(self.hours * 3600))  # Kaggle's stop: ours first
        kernel = f"{owner}/{kernel_slug}"
        if not pushed["version"]:
            raise kaggle.KaggleError(f"Kaggle took notebook {kernel} but named no version: look at "
                                     f"https://www.kaggle.com/code/{kernel}", "no notebook version")
        append_history(self.table, ensemble=self.project.relative(self.path), notebook=kernel,
                       version=str(pushed["version"]), dataset=f"{dataset} {b.content}", gpu=self.target.gpu.kind,
                       internet=str(self.target.internet).lower(), status=RUNNING,
                       units=json.dumps([{"label": u.label, "train": u.train, "key": u.key} for u in group]),
                       estimate_s=f"{seconds:.0f}", work=f"{sum(work(u) for u in group):.1f}")
        self.say(f"pushed notebook {kernel} version {pushed['version']}: {', '.join(u.label for u in group)} "
                 f"(estimate {seconds / 60:.0f} min, deadline {_duration(deadline)})")

    def _upload(self, b, dataset: str) -> None:
        from ..notebook.push import _poll

        wanted = b.files
        try:
            if kaggle.dataset_files(dataset) == wanted:
                self.say(f"dataset {dataset} already holds content {b.content}: not uploaded again")
                return
        except kaggle.KaggleError as e:
            if "404" not in e.reason:
                raise
        self.say(f"uploading dataset {dataset} ({len(wanted)} files, {sum(wanted.values()) / 1e6:.1f} MB) ...")
        kaggle.push_dataset(b.folder, dataset, f"ens units {b.content}", f"ens content {b.content}")
        status = _poll(lambda: kaggle.dataset_status(dataset), lambda s: s in ("ready", "failed", "deleted"),
                       self.first_poll, 3600, self.say)
        if status != "ready":
            raise kaggle.KaggleError(f"Kaggle did not make dataset {dataset} ready (status {status}): run again",
                                     f"dataset {status}")
        got = kaggle.dataset_files(dataset)
        lost = sorted(n for n in wanted if got.get(n) != wanted[n])
        if lost:
            raise kaggle.KaggleError(f"Kaggle's dataset {dataset} lacks or truncated {', '.join(lost)}: run again",
                                     "dataset incomplete")

    # -- following and fetching --------------------------------------------------------------------------------
    def follow(self, row: dict) -> dict:
        """Wait for the notebook to end (Ctrl-C detaches: it goes on running on Kaggle), then fetch it."""
        from ..notebook.push import _poll

        kernel, version = row["notebook"], int(row["version"])
        seen, start = [], time.monotonic()

        def finished(state: dict) -> bool:
            if state["status"] not in seen[-1:]:
                seen.append(state["status"])
                self.say(f"  notebook {kernel} version {version}: {state['status']} ({time.monotonic() - start:.0f} s)")
            return state["status"] in FINISHED

        try:
            state = _poll(lambda: kaggle.kernel_status(kernel, version), finished, self.first_poll,
                          self.hours * 3600 + 1800, self.say)
        except KeyboardInterrupt:
            raise Interrupted(f"stopped following notebook {kernel} version {version}, which goes on running on "
                              f"Kaggle; `ens kaggle status {self.comp.name}` carries on, and `ens run "
                              f"{self.project.relative(self.path)} --on kaggle` picks up what came back") from None
        if state is None or state["status"] not in FINISHED:
            return row
        return self.fetch(row, state)

    def fetch(self, row: dict, state: dict) -> dict:
        """The notebook's output: ens-run.json, then each finished unit verified into the cache, each stopped
        one's checkpoint kept for the next notebook. The row says what came back and what did not."""
        kernel, version = row["notebook"], int(row["version"])
        dest = self.cache.root / "remote" / "out" / f"{kernel.replace('/', '-')}-v{version}"
        shutil.rmtree(dest, ignore_errors=True)
        try:
            status = json.loads(kaggle.kernel_output(kernel, version, bundles.STATUS, dest).read_text())
        except (kaggle.KaggleError, ValueError) as e:
            why = state.get("failure") or state["status"]
            note = f"no readable {bundles.STATUS} in its output ({getattr(e, 'reason', e)}); Kaggle: {why}"
            update_history(self.table, row["id"], status="error", note=note[:300])
            self.say(f"notebook {kernel} version {version}: {note}")
            return dict(row, status="error", note=note)
        expected = {u["key"]: u for u in json.loads(row["units"])}
        got, lines, resumable, done_work = [], [], [], 0.0
        for key, s in status.get("units", {}).items():
            u = expected.get(key)
            if u is None:  # a unit this row never sent: not trusted
                lines.append(f"unknown unit {key} in the output: ignored")
                continue
            if s.get("state") == "done":
                try:
                    import_unit(self.cache, kaggle.kernel_output(kernel, version, s["file"], dest),
                                s.get("sha256"), u["train"], key)
                    got.append(u["label"])
                    done_work += float(s.get("seconds") or 0)
                except (Refused, kaggle.KaggleError) as e:
                    lines.append(f"{u['label']}: entry refused ({e})")
            elif s.get("state") == "refused":
                lines.append(f"{u['label']}: refused on Kaggle ({s.get('reason')})")
            else:
                if s.get("partial"):
                    try:
                        if import_partial(self.cache, kaggle.kernel_output(kernel, version, s["partial"], dest),
                                          u["train"]):
                            resumable.append(u["label"])
                    except kaggle.KaggleError:
                        pass
                lines.append(f"{u['label']}: {s.get('state')}" + (f" ({s['reason']})" if s.get("reason") else ""))
        if state["status"] != "complete":
            lines.append(f"the notebook ended {state['status']}: {state.get('failure') or 'no reason given'}")
        gpu = status.get("gpu") or {}
        rate = self._rate(row, status, got)
        summary = (f"{len(got)} of {len(expected)} unit(s) back" + (f"; {'; '.join(lines)}" if lines else "")
                   + (f"; checkpoints kept to resume {', '.join(resumable)}" if resumable else ""))
        new = dict(status="fetched" if len(got) == len(expected) else "fetched (incomplete)",
                   got_gpu=f"{gpu.get('name')} x{gpu.get('count')}", note=summary[:500],
                   seconds=f"{(status.get('ended') or time.time()) - status.get('started', time.time()):.0f}",
                   rate=f"{rate:.6f}" if rate else "", versions=json.dumps(status.get("versions") or {}))
        update_history(self.table, row["id"], **new)
        self.say(f"notebook {kernel} version {version} ran on {new['got_gpu']}: {summary}")
        return dict(row, **new)

    def _rate(self, row: dict, status: dict, got: list[str]) -> float | None:
        """Seconds per image-epoch at 224 px this notebook measured (its units all back: its whole work)."""
        seconds = [float(s.get("seconds") or 0) for s in status.get("units", {}).values() if s.get("state") == "done"]
        if not got or len(got) != len(json.loads(row["units"])) or not row.get("work") or not float(row["work"]):
            return None
        return max(sum(seconds) - UNIT_OVERHEAD * len(seconds), 1.0) / float(row["work"])


def follow_up(project: Project, comp: Competition, wait: bool, say=print) -> list[dict]:
    """`ens kaggle status`: each running training notebook of `comp` looked at once (with `wait`, followed until
    it ends); the finished ones fetched into the cache."""
    rows = [r for r in read_history(runs_path(project, comp)) if r.get("status") == RUNNING]
    out = []
    for row in rows:
        target = Target(GPUS.get(row.get("gpu"), GPUS["t4x2"]), row.get("internet") != "false")
        remote = Remote(project, comp, project.root / row["ensemble"], [], target, say)
        if wait:
            out.append(remote.follow(row))
            continue
        state = kaggle.kernel_status(row["notebook"], int(row["version"]))
        out.append(remote.fetch(row, state) if state["status"] in FINISHED else dict(row, note=state["status"]))
    return out


def train_on_kaggle(project: Project, comp: Competition, path: Path, overrides: list[str], todo: list,
                    target: Target, wait: bool = True, say=print, hours: float | None = None,
                    first_poll: float = 10.0) -> list[str]:
    """The driver's hook (`run.gather_members`): the planned units `todo` (run._Planned) trained on Kaggle; their
    entries are in the cache when this returns (those that came back). Returns one line per unit that did not."""
    from ..cache import train_key_fields
    from ..crossval import unit_name
    from ..device import assumed

    odd = [u.member.name for u in todo if u.member.classical or u.member.pseudo or u.member.distill
           or isinstance(u.member.pretrained, str)]
    if odd:
        raise EnsError(f"--on kaggle trains fastai members from the YAML alone; {', '.join(sorted(set(odd)))} "
                       "(classical, pseudo-labelled, distilled or with a local weights file) cannot go yet: train "
                       "them here first (they are then cached and not sent)")
    remote = Remote(project, comp, path, overrides, target, say, hours, first_poll)
    units = [Sent(u.member.name + ("" if u.fold is None else f" {unit_name(u.fold)}"), u.member, u.fold, u.train,
                  u.key, sum(not v for v in u.data.is_valid)) for u in todo]
    with assumed(target.gpu.facts):
        parts = {u.key: train_key_fields(u.member, p.data.fingerprint) for u, p in zip(units, todo)}
    rows = remote.send(units, parts)
    if not wait:
        raise Pending(f"{len(units)} unit(s) train on Kaggle in {', '.join(r['notebook'] for r in rows)}; "
                      f"`ens kaggle status {comp.name}` follows them, and `ens run {project.relative(path)} --on "
                      "kaggle` then blends what came back")
    notes = []
    for row in rows:
        done = remote.follow(row)
        if done.get("status") == RUNNING:
            notes.append(f"{row['notebook']} still runs")
        elif done.get("note") and done.get("status") != "fetched":
            notes.append(f"{row['notebook']}: {done['note']}")
    return notes
