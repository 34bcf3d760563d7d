"""A code competition's delivery: check the notebook here, upload its dataset, push it, follow its run, fetch and
check its CSV, submit it — each step recorded in the submission history as it goes, so that Ctrl-C or a failure
at any point leaves the truth behind and `ens kaggle status` can carry on."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .. import kaggle
from ..config import Competition, Project
from ..errors import EnsError
from ..util import owner_tag, write_json
from ..submission import (UNKNOWN, Delivery, Interrupted, append_history, check_submission, claim_history,
                          file_sha256, read_history, refresh_history, update_history)
from . import bundle as bundles
from .script import dataset_slug, kernel_slug, write_kernel
from .verify import (KAGGLE_TOLERANCE, LocalRun, kaggle_tree, run_script, runtime_estimate, same_submission,
                     submission_difference)

DESTINATION = "kaggle notebook"
RUNNING = ("running", "running+submit")  # the notebook runs on Kaggle; +submit: submit it when it is done
FINISHED = ("complete", "error", "cancel_acknowledged")
WARN_SHARE, REFUSE_SHARE = 0.5, 0.9  # of the competition's runtime limit, for the estimated hidden-test run


class CsvDiffers(EnsError):
    """Kaggle's run of the notebook wrote another CSV than the one checked here: `reason` for the history."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def takes_notebooks(comp: Competition) -> bool:
    """Whether submissions to `comp` are notebooks: its YAML says so, or (auto) Kaggle does."""
    if comp.submission == "auto" and comp.kaggle:
        return bool(kaggle.competition_info(comp.kaggle)["kernels_only"])
    return comp.submission == "notebook"


def _env_seconds(name: str, default: float) -> float:
    """A wait from the environment: at least 0.1 s (0 would poll Kaggle without pause), else one line."""
    text = os.environ.get(name)
    try:
        return default if not text else max(0.1, float(text))
    except ValueError:
        raise EnsError(f"{name}={text!r}: give the seconds as a number, e.g. {name}=2") from None


def _poll(what, done, first: float, limit: float, say) -> dict:
    """Call `what()` with back-off (`first` s, or $ENS_KAGGLE_POLL; doubling to 60 s, or $ENS_KAGGLE_POLL_MAX)
    until `done(answer)` or `limit` seconds; transient Kaggle failures are retried. A short cap answers sooner
    after a notebook ends (at the cost of more calls to Kaggle: the fake server's tests use 2 s)."""
    first = _env_seconds("ENS_KAGGLE_POLL", first)
    cap = max(_env_seconds("ENS_KAGGLE_POLL_MAX", 60.0), first)
    deadline, delay, answer = time.monotonic() + limit, first, None
    while True:
        try:
            answer = what()
            if done(answer):
                return answer
        except kaggle.KaggleError as e:
            if not e.transient:
                raise
            say(f"  ({e.reason}; retrying)")
        if time.monotonic() + delay > deadline:
            return answer
        time.sleep(delay)
        delay = min(delay * 2, cap)


class NotebookDelivery:
    """The state of one notebook delivery to competition `comp` (data under `data_root`, classes `vocab`): the CSV
    the cached test probabilities gave (`csv`, shown as `shown`), the submission message, and the history row."""

    def __init__(self, project: Project, comp: Competition, data_root: Path, vocab: list[str], csv: Path,
                 shown: str, message: str, history: Path, say=print, first_poll: float = 5.0, force: bool = False):
        self.project, self.comp, self.data_root, self.vocab = project, comp, data_root, vocab
        self.csv, self.shown, self.message, self.history = csv, shown, message, history
        self.say, self.first_poll = say, first_poll
        self.force = force  # submit even a Kaggle run whose CSV differs from the one checked here
        self.row_id = ""

    # -- here, before anything is uploaded --------------------------------------------------------------------
    def check_here(self, g, chosen: bundles.Chosen, check_runtime: bool = True) -> tuple:
        """The dataset folder of `chosen` (of the gathered ensemble `g`) built, and its notebook run here on the
        public test: (bundle, kernel folder)."""
        b = bundles.build(self.project, g, chosen)
        kernel_dir = b.folder.parent / f"kernel-{chosen.name}"
        script = write_kernel(kernel_dir, self.comp, chosen.name, b, "owner")
        # a passed check holds for the same dataset, script, public data and expected CSV: not run again
        memo = b.folder.parent / "checked.json"
        checked = {"script": script.read_text(), "data": g.data.fingerprint, "csv": file_sha256(self.csv)}
        previous = json.loads(memo.read_text()) if memo.is_file() else {}
        if previous.get("checked") == checked:
            run = LocalRun(self.csv, previous["seconds"], previous["timing"], "")
            self.say(f"the notebook of dataset content {b.content} passed the check here before (same data, same CSV)")
        else:
            run = self._run_here(g, b, script)
            write_json(memo, {"checked": checked, "seconds": run.seconds, "timing": run.timing})
        estimate = runtime_estimate(run, self.comp, run.timing.get("device", "cpu"))
        share = f"{estimate.seconds / 3600:.2f} h of the {self.comp.notebook.runtime_hours:g} h limit"
        self.say(f"  same {run.timing['rows']} rows as {self.shown}; {run.seconds:.0f} s here; hidden test "
                 f"estimate {share} ({estimate.basis})")
        if check_runtime and estimate.share > REFUSE_SHARE:
            raise EnsError(f"the notebook would need about {share} on the hidden test set ({estimate.basis}): over "
                           f"{REFUSE_SHARE:.0%}, it would likely time out; use fewer members, TTA passes or folds, or "
                           "a smaller size (or --no-runtime-check when this machine is much slower than Kaggle's)")
        if estimate.share > WARN_SHARE:
            self.say(f"  warning: that is over {WARN_SHARE:.0%} of the limit")
        return b, kernel_dir

    def _run_here(self, g, b, script: Path) -> LocalRun:
        """The notebook's script run here on the public test (`verify`); its CSV must equal the expected one."""
        work = b.folder.parent / f"check.{owner_tag()}"
        self.say(f"checking the notebook here (network off) on {len(g.data.test_paths)} public test images ...")
        try:
            slug = dataset_slug(self.comp, b.manifest["ensemble"])
            root = kaggle_tree(work, self.comp, self.data_root, b.folder, slug)
            run = run_script(script, root, self.comp.notebook.output, timeout=self.comp.notebook.runtime_hours * 3600)
            if ".whl" not in run.timing.get("ens_from", ""):
                raise EnsError(f"the notebook imported ens from {run.timing.get('ens_from')}, not from its dataset's "
                               "wheel: it would fail on Kaggle; report this as a bug of ens")
            same_submission(run.csv, self.csv, self.comp)
        finally:
            if not (work / "notebook.log").exists():  # a failure's log stays for the user to read
                shutil.rmtree(work, ignore_errors=True)
        return run

    # -- on Kaggle --------------------------------------------------------------------------------------------
    def upload(self, b, owner: str) -> str:
        """The dataset's current version holding exactly `b`'s files (uploaded unless it already does):
        "owner/slug/version"."""
        dataset = f"{owner}/{dataset_slug(self.comp, b.manifest['ensemble'])}"
        b.write_marker()
        wanted = b.files
        try:
            if kaggle.dataset_files(dataset) == wanted:
                version = kaggle.dataset_version(dataset)
                self.say(f"dataset {dataset} version {version} already holds content {b.content}: not uploaded again")
                return f"{dataset}/{version}"
        except kaggle.KaggleError as e:
            if "404" not in e.reason:
                raise
        size = sum(wanted.values()) / 1e6
        self.say(f"uploading dataset {dataset} ({len(wanted)} files, {size:.1f} MB, content {b.content}) ...")
        kaggle.push_dataset(b.folder, dataset, f"ens {self.comp.name} models", f"ens content {b.content}")
        status = _poll(lambda: kaggle.dataset_status(dataset), lambda s: s in ("ready", "failed", "deleted"),
                       self.first_poll, 3600, self.say)
        if status != "ready":
            raise kaggle.KaggleError(f"Kaggle did not make dataset {dataset} ready (status {status}): run again to "
                                     "upload a new version", f"dataset {status}")
        got = kaggle.dataset_files(dataset)
        lost = sorted(n for n in wanted if got.get(n) != wanted[n])
        if lost:  # the client drops a failed file upload silently and still creates the version
            shown = ", ".join(f"{n} ({got[n]} of {wanted[n]} bytes)" if n in got else f"{n} (missing)" for n in lost)
            raise kaggle.KaggleError(f"Kaggle's new version of dataset {dataset} lacks {shown}: run again to upload "
                                     "another version", "dataset incomplete")
        version = kaggle.dataset_version(dataset)
        self.say(f"dataset {dataset} version {version} is ready, every file checked")
        return f"{dataset}/{version}"

    def push(self, kernel_dir: Path, ensemble: str, b, owner: str, dataset: str) -> tuple[str, int]:
        write_kernel(kernel_dir, self.comp, ensemble, b, owner)
        pushed = kaggle.push_kernel(kernel_dir)
        kernel, version = f"{owner}/{kernel_slug(self.comp, ensemble)}", pushed["version"]
        if not version:
            raise kaggle.KaggleError(f"Kaggle took notebook {kernel} but named no version: look at "
                                     f"https://www.kaggle.com/code/{kernel} and retry", "no notebook version")
        self.say(f"pushed notebook {kernel} version {version} (dataset {dataset}); Kaggle runs it on the public test")
        return kernel, version

    def follow(self, kernel: str, version: int) -> None:
        """Wait for the notebook's run on Kaggle; Ctrl-C detaches (it goes on running there)."""
        limit = self.comp.notebook.runtime_hours * 3600 + 1800
        seen, start = [], time.monotonic()

        def finished(state: dict) -> bool:
            if state["status"] not in seen[-1:]:  # each new state said once
                seen.append(state["status"])
                self.say(f"  notebook {kernel} version {version}: {state['status']} ({time.monotonic() - start:.0f} s)")
            return state["status"] in FINISHED

        try:
            state = _poll(lambda: kaggle.kernel_status(kernel, version), finished, self.first_poll, limit, self.say)
        except KeyboardInterrupt:
            raise Interrupted(f"stopped following notebook {kernel} version {version}, which goes on running on "
                              f"Kaggle; `ens kaggle status {self.comp.name}` carries on") from None
        if state is None or state["status"] not in FINISHED:
            raise kaggle.KaggleError(f"notebook {kernel} version {version} is still running after {limit / 3600:.1f} h"
                                     f"; `ens kaggle status {self.comp.name}` carries on", "still running",
                                     transient=True)
        if state["status"] != "complete":
            why = state["failure"] or state["status"]
            raise kaggle.KaggleError(f"notebook {kernel} version {version} failed on Kaggle ({why}): look at its log "
                                     f"at https://www.kaggle.com/code/{kernel}, fix and push again",
                                     f"notebook {state['status']}: {why}")

    def fetch(self, kernel: str, version: int) -> Path:
        """Kaggle's run's CSV, fetched beside the expected one, checked against the sample submission and compared
        with the CSV checked here: another device moves probabilities in their last digits (KAGGLE_TOLERANCE);
        a changed label, or more, is not what was validated, and is an error unless `force`."""
        dest = self.csv.with_name(self.csv.stem + f".notebook-v{version}")
        path = kaggle.kernel_output(kernel, version, self.comp.notebook.output, dest)
        rows = check_submission(path, self.data_root / self.comp.sample_submission, self.comp, self.vocab)
        if submission_difference(path, self.csv, self.comp) is None:
            agree = "the same as here"
        else:
            difference = submission_difference(path, self.csv, self.comp, KAGGLE_TOLERANCE)
            if difference is None:
                agree = f"the same as here within {KAGGLE_TOLERANCE:g} (another device's arithmetic)"
            elif not self.force:
                raise CsvDiffers(f"the CSV of notebook {kernel} version {version} on Kaggle differs from the one "
                                 f"checked here {difference}, beyond another device's arithmetic: it is not what "
                                 f"was validated, so nothing was submitted; compare {dest / path.name} with "
                                 f"{self.shown}, or submit it all the same: ens kaggle submit {self.comp.name} "
                                 f"{kernel}/{version} --force", f"its CSV differs from the one checked here {difference}")
            else:
                agree = f"differs from here {difference} (--force: taken all the same)"
        self.say(f"notebook {kernel} version {version} wrote {rows} checked rows, {agree}")
        return path


def deliver(project: Project, g, chosen: bundles.Chosen, csv: Path, shown: str, message: str, history: Path,
            record: dict, submit: bool, wait: bool = True, wait_seconds: float = 600, say=print,
            check_runtime: bool = True, first_poll: float = 5.0, force: bool = False) -> Delivery:
    """Push `chosen` (members of the gathered ensemble `g`, weights kept; `csv` written from their cached test
    probabilities) as a notebook, and with `submit` submit it: a Delivery, its history row written as it goes. A
    failure before the push leaves nothing on Kaggle; every failure is a Delivery with a one-line error."""
    d = NotebookDelivery(project, g.competition, g.data.root, list(g.data.vocab), csv, shown, message, history,
                         say, first_poll, force)
    row = dict(record, file=shown, sha256=file_sha256(csv), message=message, destination=DESTINATION)
    row.setdefault("metric", g.competition.metric)
    retry = f"ens kaggle push {project.relative(g.path)}" + (" --submit" if submit else "")  # (as it was run)
    try:
        b, kernel_dir = d.check_here(g, chosen, check_runtime)
        owner = kaggle.whoami()
        dataset = d.upload(b, owner)
        kernel, version = d.push(kernel_dir, chosen.name, b, owner, dataset)
    except EnsError as e:
        reason = " ".join(getattr(e, "reason", str(e)).split())[:200]
        row_id = append_history(history, **dict(row, destination=f"not submitted: {reason}"))
        return Delivery(DESTINATION, error=f"{e}; the CSV is kept — retry: {retry}", row_id=row_id)
    row.update(dataset=f"{dataset} {b.content}", notebook=f"{kernel}/{version}",
               status="running+submit" if submit else "running")
    d.row_id = append_history(history, **row)
    if not wait:
        return Delivery(DESTINATION, status=row["status"], row_id=d.row_id,
                        note=f"notebook {kernel} version {version} runs on Kaggle; `ens kaggle status "
                             f"{g.competition.name}` follows it" + (" and submits it" if submit else ""))
    return carry_on(d, kernel, version, submit, wait_seconds)


def carry_on(d: NotebookDelivery, kernel: str, version: int, submit: bool, wait_seconds: float) -> Delivery:
    """From a pushed notebook: follow its run, fetch and check its CSV, submit it (with `submit`), wait for the
    score; the history row `d.row_id` follows."""
    comp = d.comp
    try:
        d.follow(kernel, version)
        d.fetch(kernel, version)
    except EnsError as e:  # KaggleErrors, and a CSV that fails the check
        if getattr(e, "transient", False):
            return Delivery(DESTINATION, status="running", row_id=d.row_id, note=str(e))
        update_history(d.history, d.row_id, status="notebook error", note=getattr(e, "reason", str(e))[:300])
        return Delivery(DESTINATION, status="notebook error", row_id=d.row_id, error=str(e))
    if not submit:
        update_history(d.history, d.row_id, status="ran", note="not submitted")
        return Delivery(DESTINATION, status="ran", row_id=d.row_id,
                        note=f"notebook {kernel} version {version} ran; submit it with `ens kaggle submit "
                             f"{comp.name} {kernel}/{version}`")
    return submit_version(d.history, d.row_id, comp, kernel, version, d.message, wait_seconds, d.say,
                          claimable=("running+submit",))


def submit_version(history: Path, row_id: str, comp: Competition, kernel: str, version: int, message: str,
                   wait_seconds: float, say=print, claimable: tuple[str, ...] = ("ran",)) -> Delivery:
    """CreateCodeSubmission of a notebook version that ran, then (bounded) the wait for its score.

    The row is claimed first, as `unknown`, in one locked step with the check that its status is still one of
    `claimable`: of two processes carrying on with one notebook, one submits it. From then on, what cuts the
    call off after it may have reached Kaggle (a time-out, a crash, Ctrl-C) leaves it `unknown`, which nothing
    submits again; `ens kaggle status` and `ens submissions` look for it on Kaggle's list."""
    from ..submission import error_hint

    notebook = f"{kernel}/{version}"
    before = claim_history(history, row_id, claimable, status=UNKNOWN,
                           note="submitting; if this stays, ens stopped before Kaggle answered")
    if before.get("status") not in claimable:
        return Delivery(DESTINATION, before.get("ref", ""), before.get("status", ""), row_id=row_id,
                        note=f"notebook {notebook} is {before.get('status') or 'not ready'} already (another ens "
                             "submitted it, or is submitting it): not submitted again")
    try:
        ref = kaggle.submit_code(comp.kaggle, kernel, version, comp.notebook.output, message)
    except kaggle.KaggleError as e:
        if e.maybe_submitted:
            update_history(history, row_id, note=f"{e.reason}: Kaggle may have it")
            return Delivery(DESTINATION, status=UNKNOWN, row_id=row_id, error=(
                f"submission outcome unknown ({e.reason} while submitting notebook {notebook}): Kaggle may have it — "
                f"`ens kaggle status {comp.name}` looks for it on Kaggle's list (send it again only if it is not "
                f"there: ens kaggle submit {comp.name} {notebook} --force)"))
        status = "notebook error" if before.get("status") == "notebook error" else "ran"  # Kaggle said no: as it was
        update_history(history, row_id, status=status, note=f"not submitted: {e.reason}")
        return Delivery(DESTINATION, status=status, row_id=row_id, error=f"{e}; retry: ens kaggle submit "
                        f"{comp.name} {notebook}" + (" --force" if status == "notebook error" else ""))
    except KeyboardInterrupt:
        update_history(history, row_id, note="interrupted during the submission: Kaggle may have it")
        raise Interrupted(f"interrupted while submitting notebook {notebook}: Kaggle may have it, so it is recorded "
                          f"as unknown; `ens kaggle status {comp.name}` looks for it on Kaggle's list") from None
    update_history(history, row_id, ref=ref, status="pending", note="")
    say(f"submitted notebook {kernel} version {version} as ref {ref}; waiting (at most {wait_seconds / 60:g} min) "
        "while Kaggle re-runs it on the hidden test set ...")
    try:
        found = kaggle.wait_for_score(comp.kaggle, ref, total_timeout=wait_seconds)
    except kaggle.KaggleError as e:
        return Delivery(DESTINATION, ref, "pending", row_id=row_id, note=f"submitted as ref {ref}, not scored yet "
                        f"({e.reason}): Kaggle re-runs the notebook on the hidden test set; `ens submissions "
                        f"{comp.name}` fetches its score")
    except KeyboardInterrupt:
        raise Interrupted(f"notebook {kernel} version {version} is submitted as ref {ref}; `ens submissions "
                          f"{comp.name}` fetches its score") from None
    if found["status"] == "error":
        hint = error_hint(found.get("error_description") or "")
        update_history(history, row_id, status="error", note=hint)
        return Delivery(DESTINATION, ref, "error", row_id=row_id, error=f"Kaggle could not score ref {ref}: {hint}")
    score = "" if found.get("public_score") is None else f"{found['public_score']:.6f}"
    update_history(history, row_id, status=found["status"], score=score)
    return Delivery(DESTINATION, ref, found["status"], score, row_id=row_id,
                    note=f"notebook {kernel} version {version} submitted as ref {ref}: public score "
                         f"{score or '(none shown yet)'}")


def open_rows(history: Path) -> list[dict]:
    return [r for r in read_history(history) if r.get("destination") == DESTINATION and r.get("status") in RUNNING]


def _delivery_of(project: Project, comp: Competition, row: dict, history: Path, say, first_poll: float):
    """A NotebookDelivery rebuilt from its history row (the data's files give the classes; no torch)."""
    from ..data import ensure_data, list_train

    root = ensure_data(project, comp)
    vocab = sorted(set(list_train(comp, root)[1]))
    d = NotebookDelivery(project, comp, root, vocab, project.root / row["file"], row["file"], row.get("message", ""),
                         history, say, first_poll)
    d.row_id = row["id"]
    return d


def follow_up(project: Project, comp: Competition, wait: bool, wait_seconds: float = 600, say=print,
              first_poll: float = 5.0) -> list[tuple[str, Delivery]]:
    """Carry on with every notebook of `comp` still running on Kaggle (after Ctrl-C, --no-wait or a time-out):
    its state; with `wait`, or once it has finished, its CSV fetched and checked and (if asked at push) submitted.
    [(owner/slug/version, Delivery)]."""
    history = project.submissions / comp.name / "history.csv"
    if any(r.get("destination") == DESTINATION and r.get("status") == UNKNOWN for r in read_history(history)):
        _, warning = refresh_history(comp, history)  # submissions cut off before Kaggle answered: on its list?
        if warning:
            say(f"warning: {warning}")
    out = []
    for row in open_rows(history):
        kernel, _, version = row["notebook"].rpartition("/")
        d = _delivery_of(project, comp, row, history, say, first_poll)
        if not wait:
            state = kaggle.kernel_status(kernel, int(version))
            if state["status"] not in FINISHED:
                out.append((row["notebook"], Delivery(DESTINATION, status=row["status"], row_id=row["id"],
                                                      note=f"still {state['status']} on Kaggle")))
                continue
        out.append((row["notebook"], carry_on(d, kernel, int(version), row["status"] == "running+submit",
                                              wait_seconds)))
    return out


def submit_ran(project: Project, comp: Competition, notebook: str, message: str | None,
               wait_seconds: float = 600, say=print, force: bool = False) -> Delivery:
    """Submit a notebook version that ran (`owner/slug/version`, as `ens submissions` lists it); with `force` also
    one recorded as a notebook error (its CSV differed from here) or of unknown outcome (not on Kaggle's list)."""
    history = project.submissions / comp.name / "history.csv"
    rows = [r for r in read_history(history) if r.get("destination") == DESTINATION and r.get("notebook") == notebook]
    if not rows:
        raise EnsError(f"no notebook {notebook} in submissions/{comp.name}/history.csv: push it first with "
                       "`ens kaggle push ENSEMBLE`")
    row = rows[-1]
    claimable = ("ran", "notebook error", UNKNOWN) if force else ("ran",)
    if row.get("status") not in claimable:
        more = " (--force submits it all the same)" if row.get("status") in ("notebook error", UNKNOWN) else ""
        raise EnsError(f"notebook {notebook} is '{row.get('status')}', not ready to submit: only a version that ran "
                       f"on Kaggle and wrote a checked CSV can be ('ens kaggle status {comp.name}' follows a running "
                       f"one){more}")
    kernel, _, version = notebook.rpartition("/")
    return submit_version(history, row["id"], comp, kernel, int(version), message or row.get("message", ""),
                          wait_seconds, say, claimable)
