"""Each call ens makes to Kaggle, run by the `kaggle` client in a child process with a deadline; failures as one
line (`KaggleError`), never a secret."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import KaggleError
from ..util import file_lock, lock_file_for
from .extract import _check_slug, _dir_size, _extract, _partial_path, _sweep_partials

RULES_URL = "https://www.kaggle.com/competitions/{slug}/rules"


TOKEN_URL = "https://www.kaggle.com/settings/api"


CREDENTIALS_HELP = ("save your API token as ~/.kaggle/kaggle.json ({\"username\": ..., \"key\": ...}), "
                    "or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN "
                    f"(create one at {TOKEN_URL})")


DOWNLOAD_TIMEOUT = 120.0  # seconds without a new downloaded byte (a big download may take longer in all)


SUBMIT_TIMEOUT = 300.0    # seconds for the whole submission (start, upload, create)


CALL_TIMEOUT = 60.0       # seconds for a listing or a limits call


def download(slug: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT, force: bool = False) -> Path:
    """Download competition `slug`'s data (DownloadDataFiles: one zip) and extract it safely into `dest`.

    `dest` appears only once complete: the zip is fetched into a temporary sibling folder and extracted into
    another that is renamed to `dest` at the end, so an interrupted download or unzip leaves no `dest` (its
    leftovers are swept by the next call) and is simply redone. An existing `dest` is returned untouched unless
    `force`, which downloads again and replaces it. `timeout` bounds the time without progress: the call is
    stopped when no new byte arrives for `timeout` seconds. One process downloads into `dest` at a time (a lock
    file named by `dest` in ens's user cache, util.lock_file_for): a second first run waits for the first one's
    download and uses it, instead of downloading again and replacing the folder the first one is reading."""
    _check_slug(slug)
    dest = Path(dest)
    if dest.is_dir() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    def say():
        print(f"waiting for another ens run building {dest} (downloading '{slug}') ...", file=sys.stderr, flush=True)

    with file_lock(lock_file_for(dest), on_wait=say):
        _sweep_partials(dest)
        if dest.is_dir() and not force:
            return dest
        return _download_locked(slug, dest, timeout)


def _download_locked(slug: str, dest: Path, timeout: float) -> Path:
    work = _partial_path(dest, "download")
    work.mkdir()
    try:
        _call("download", {"slug": slug, "folder": str(work)}, timeout, f"downloading the data of '{slug}'", slug,
              progress_dir=work)
        zips = sorted(p for p in work.rglob("*") if p.is_file() and not p.name.endswith(".kaggle-partial"))
        if len(zips) != 1:
            raise KaggleError(f"Kaggle's download of '{slug}' gave {len(zips)} files instead of one zip archive; "
                              "retry, or download it from the competition's data page",
                              f"download gave {len(zips)} files")
        return _extract(zips[0], dest, f"Kaggle's data archive of '{slug}'")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def submit(slug: str, csv: Path, message: str, timeout: float = SUBMIT_TIMEOUT) -> str:
    """Submit `csv` to competition `slug` with description `message`; returns the submission's ref (as text).

    A KaggleError's `maybe_submitted` is True when Kaggle may have the submission all the same: the call was cut
    off (no answer in time, the client died, the connection closed) after the file may have reached Kaggle, or
    Kaggle accepted the file without naming its ref. Then only Kaggle's list can tell."""
    _check_slug(slug)
    csv = Path(csv)
    if not csv.is_file():
        raise KaggleError(f"{csv}: no such file to submit", "missing file")
    try:
        result = _call("submit", {"slug": slug, "csv": str(csv.resolve()), "message": message}, timeout,
                       f"submitting {csv.name} to '{slug}'", slug)
    except KaggleError as e:
        e.maybe_submitted = e.kind in ("timeout", "crashed", "noref") or (
            e.kind == "connection" and e.detail == "connection closed")
        raise
    return str(result["ref"])


def list_submissions(slug: str, timeout: float = CALL_TIMEOUT) -> list[dict]:
    """Your submissions to `slug`, newest first (the API's first page, 20 at most): dicts with ref (text), date
    (ISO text), description, file_name, status ('pending' | 'complete' | 'error'), public_score (float or None),
    error_description."""
    _check_slug(slug)
    return _call("list", {"slug": slug}, timeout, f"listing the submissions to '{slug}'", slug)


def remaining_submissions(slug: str, timeout: float = CALL_TIMEOUT) -> int | None:
    """How many submissions to `slug` are left today (GetSubmissionLimits' numAllowedNow); None when Kaggle does
    not know (the API answers all zeros until you have joined the competition)."""
    _check_slug(slug)
    limits = _call("limits", {"slug": slug}, timeout, f"reading the submission limits of '{slug}'", slug)
    if not any((limits["num_today"], limits["num_total"], limits["num_allowed_now"])):
        return None
    return int(limits["num_allowed_now"])


def wait_for_score(slug: str, ref: str, total_timeout: float = 600, first_delay: float = 2,
                   max_delay: float = 60) -> dict:
    """Poll `list_submissions` (after `first_delay` s, doubling up to `max_delay` s) until submission `ref` is
    'complete' or 'error', and return its dict. Transient failures (429, 5xx, no answer, unreachable) are retried
    until `total_timeout` s have passed; other failures raise at once. Raises a KaggleError when the submission is
    still pending (or missing) after `total_timeout` s."""
    deadline = time.monotonic() + total_timeout
    delay, last, last_error = max(first_delay, 0.0), None, None
    while True:
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
        left = deadline - time.monotonic()
        if left <= 0.05:
            break
        try:
            found = [s for s in list_submissions(slug, timeout=min(CALL_TIMEOUT, max(left, 1.0)))
                     if s["ref"] == str(ref)]
        except KaggleError as e:
            if not e.transient:
                raise
            last_error = e
        else:
            last_error = None
            if found:
                last = found[0]
                if last["status"] in ("complete", "error"):
                    return last
        delay = min(max(delay * 2, 0.5), max_delay)
    state = f"still {last['status']}" if last else ("not listed" if last_error is None else last_error.reason)
    raise KaggleError(f"submission {ref} to '{slug}' was not scored within {total_timeout:g} s ({state}); "
                      "look again later with `ens submissions`", f"not scored within {total_timeout:g} s ({state})",
                      transient=True)


PUSH_TIMEOUT = 1800.0  # seconds for a whole dataset upload (the client shows no progress to watch)


def competition_info(slug: str, timeout: float = CALL_TIMEOUT) -> dict:
    """{title, evaluation_metric, kernels_only}: what GetCompetition says of `slug` (kernels_only: the competition
    takes notebook submissions only — a code competition)."""
    _check_slug(slug)
    return _call("info", {"slug": slug}, timeout, f"reading competition '{slug}'", slug)


def whoami(timeout: float = CALL_TIMEOUT) -> str:
    """The Kaggle user name of the credentials (the owner of the datasets and notebooks ens pushes)."""
    return _call("whoami", {}, timeout, "reading your Kaggle user name", "")


def push_dataset(folder: Path, dataset: str, title: str, notes: str, timeout: float = PUSH_TIMEOUT) -> dict:
    """Upload the top-level files of `folder` as a new version of the private dataset `dataset` ("owner/slug"),
    created when it does not exist. {ref, created}. Kaggle's refusals, which the client only prints (status
    'error' in a successful answer), are KaggleErrors here."""
    return _call("push_dataset", {"folder": str(folder), "dataset": dataset, "title": title, "notes": notes},
                 timeout, f"uploading dataset {dataset}", dataset, not_found=f"dataset {dataset}")


def dataset_status(dataset: str, timeout: float = CALL_TIMEOUT) -> str:
    """'ready', 'failed', 'deleted', or a processing state ('blobs_received', ...): GetDatasetStatus."""
    return _call("dataset_status", {"dataset": dataset}, timeout, f"reading the status of dataset {dataset}", dataset,
                 not_found=f"dataset {dataset}")


def dataset_version(dataset: str, timeout: float = CALL_TIMEOUT) -> int:
    """The number of the dataset's current version (GetDataset)."""
    return _call("dataset_version", {"dataset": dataset}, timeout, f"reading the version of dataset {dataset}",
                 dataset, not_found=f"dataset {dataset}")


def dataset_files(dataset: str, timeout: float = CALL_TIMEOUT) -> dict[str, int]:
    """{file name: size in bytes} of the dataset's current version (every page)."""
    return _call("dataset_files", {"dataset": dataset}, timeout, f"listing the files of dataset {dataset}", dataset,
                 not_found=f"dataset {dataset}")


def push_kernel(folder: Path, timeout: float = CALL_TIMEOUT, session_seconds: int | None = None) -> dict:
    """Push the notebook described by `folder`/kernel-metadata.json as a new version, which Kaggle then runs.
    {ref, version, url}. An `error` or any source Kaggle does not know (which the client prints and the server
    drops, running the notebook without it) is a KaggleError here. `session_seconds`: Kaggle ends the session
    after that long (session_timeout_seconds; under Kaggle's own limit)."""
    meta = json.loads((Path(folder) / "kernel-metadata.json").read_text())
    args = {"folder": str(folder)} | ({"timeout": int(session_seconds)} if session_seconds else {})
    return _call("push_kernel", args, timeout, f"pushing notebook {meta['id']}", meta["id"],
                 not_found=f"notebook {meta['id']}")


def kernel_status(kernel: str, version: int, timeout: float = CALL_TIMEOUT) -> dict:
    """{status: 'queued' | 'running' | 'complete' | 'error' | 'cancel_requested' | 'cancel_acknowledged' | ...,
    failure: Kaggle's message or ''} of version `version` of notebook `kernel` ("owner/slug")."""
    return _call("kernel_status", {"kernel": kernel, "version": int(version)}, timeout,
                 f"reading the status of notebook {kernel} version {version}", kernel,
                 not_found=f"notebook {kernel} version {version}")


def kernel_output(kernel: str, version: int, name: str, dest: Path, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Download the output file `name` of version `version` of `kernel` into the folder `dest`; only that file
    (a plain name, no folder): other outputs, and names that would land outside `dest`, are never fetched."""
    if not name or "/" in name or "\\" in name or name in (".", ".."):
        raise KaggleError(f"'{name}' is not a plain file name: the notebook's output must be a file in its working "
                          "folder", "bad output name")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    got = _call("kernel_output", {"kernel": kernel, "version": int(version), "name": name, "folder": str(dest)},
                timeout, f"downloading {name} from notebook {kernel} version {version}", kernel, progress_dir=dest,
                not_found=f"notebook {kernel} version {version}")
    path = dest / name
    if not got or not path.is_file():
        raise KaggleError(f"notebook {kernel} version {version} wrote no {name}: look at its log on Kaggle, fix the "
                          "notebook and push again", f"no {name} in the output", kind="nooutput")
    return path


def gpu_quota(timeout: float = CALL_TIMEOUT) -> dict:
    """{used, allowed (hours), refresh (ISO time)} of the weekly GPU quota, as Kaggle reports it."""
    return _call("gpu_quota", {}, timeout, "reading your weekly GPU quota", "", not_found="weekly GPU quota")


def submit_code(slug: str, kernel: str, version: int, name: str, message: str,
                timeout: float = SUBMIT_TIMEOUT) -> str:
    """Submit version `version` of notebook `kernel` to the code competition `slug` (Kaggle re-runs it on the
    hidden test set and scores its file `name`); the submission's ref (as text). `maybe_submitted` as for `submit`."""
    _check_slug(slug)
    try:
        result = _call("submit_code", {"slug": slug, "kernel": kernel, "version": int(version), "name": name,
                                       "message": message}, timeout,
                       f"submitting notebook {kernel} version {version} to '{slug}'", slug)
    except KaggleError as e:  # cut off after the request may have reached Kaggle: only its list can tell (as `submit`)
        e.maybe_submitted = e.kind in ("timeout", "crashed", "noref") or (
            e.kind == "connection" and e.detail == "connection closed")
        raise
    return str(result["ref"])


def _secrets() -> list[str]:
    values = [os.environ.get(k, "") for k in ("KAGGLE_KEY", "KAGGLE_API_TOKEN")]
    return [v for v in values if len(v) >= 4]


def _scrub(text: str) -> str:
    for secret in _secrets():
        text = text.replace(secret, "***")
    return " ".join(text.split())


def _child_env() -> dict:
    env = dict(os.environ)
    for name in ("VERBOSE", "VERBOSE_OUTPUT"):  # the client would print requests, credentials included
        env.pop(name, None)
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _call(op: str, args: dict, timeout: float, doing: str, slug: str, progress_dir: Path | None = None,
          not_found: str | None = None):
    """Run `op` in a child process with the real client; its result, or a KaggleError. Without `progress_dir` the
    child is killed `timeout` s after it started; with it, after `timeout` s without the folder growing.
    $ENS_KAGGLE_TIMEOUT (seconds), when set, caps every such limit."""
    if os.environ.get("ENS_KAGGLE_TIMEOUT"):
        timeout = min(timeout, float(os.environ["ENS_KAGGLE_TIMEOUT"]))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r}); "
            "from pipelines.kaggle import _child_main; _child_main()")
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-c", code, op, json.dumps(args)], stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, env=_child_env())
        last_change, size = time.monotonic(), -1
        try:
            while True:
                try:
                    proc.wait(timeout=0.2)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if progress_dir is not None:
                    new = _dir_size(progress_dir)
                    if new != size:
                        size, last_change = new, now
                if now - last_change > timeout:
                    raise KaggleError(f"no answer from Kaggle within {timeout:g} s while {doing}: retry later, or "
                                      "check the network", f"timeout: no answer within {timeout:g} s", transient=True,
                                      kind="timeout")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        lines = out.read().decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise KaggleError(f"the Kaggle client stopped without an answer while {doing} (exit code "
                          f"{proc.returncode}); check that the `kaggle` package is installed and retry", "client crashed",
                          kind="crashed") from None
    if "ok" in result:
        return result["ok"]
    error = _error(result["error"], doing, slug, timeout, not_found)
    error.kind, error.detail = result["error"].get("kind"), result["error"].get("detail") or ""
    raise error


def _error(info: dict, doing: str, slug: str, timeout: float, not_found: str | None = None) -> KaggleError:
    kind, status = info.get("kind"), info.get("status")
    if kind == "refused":  # Kaggle said no in a successful answer (the CLI prints it and exits 0)
        detail = _scrub(str(info.get("detail") or "no reason given"))[:300]
        return KaggleError(f"Kaggle refused {doing}: {detail}; nothing changed there — fix it and retry",
                           f"refused: {detail}")
    if kind == "http" and status == 404 and not_found:
        return KaggleError(f"Kaggle has no {not_found} (404 not found while {doing}): check the name and that these "
                           "credentials own it", f"404 not found: {not_found}")
    rules = RULES_URL.format(slug=slug)
    if kind == "nocreds":
        return KaggleError(f"no Kaggle credentials found: {CREDENTIALS_HELP}", "no credentials")
    if kind == "badtoken":
        return KaggleError(f"Kaggle did not accept the API token from {info.get('source', 'KAGGLE_API_TOKEN')}: "
                           f"create a new one at {TOKEN_URL}", "401 invalid API token")
    if kind == "upload":
        return KaggleError(f"the upload failed while {doing} (Kaggle's storage refused the file): nothing was "
                           "submitted; retry later", "upload failed: nothing submitted", transient=True)
    if kind == "connection":
        detail = info.get("detail") or "connection failed"
        return KaggleError(f"cannot reach Kaggle while {doing} ({detail}): check the network or proxy and retry",
                           f"unreachable: {detail}", transient=True)
    if kind == "timeout":
        return KaggleError(f"no answer from Kaggle within {timeout:g} s while {doing}: retry later",
                           f"timeout: no answer within {timeout:g} s", transient=True)
    if kind == "http":
        if status == 401:
            return KaggleError(f"Kaggle rejected the credentials while {doing} (401 unauthorized): check the key in "
                               "~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY or KAGGLE_API_TOKEN, or create a "
                               f"new token at {TOKEN_URL}", "401 unauthorized: check the credentials")
        if status == 403:
            return KaggleError(f"Kaggle refused {doing} (403 forbidden): accept the competition's rules at {rules} "
                               f"(or join it), and check that the slug '{slug}' is right",
                               f"403 forbidden: accept the rules at {rules}")
        if status == 404:
            return KaggleError(f"Kaggle has no competition '{slug}' (404 not found while {doing}): check the slug, "
                               "the part after /competitions/ in the competition's URL",
                               f"404 not found: check the slug '{slug}'")
        if status == 429:
            return KaggleError(f"Kaggle is rate-limiting you (429 too many requests while {doing}; the daily "
                               "submission quota may be used up): try again later",
                               "429 rate limited: try later", transient=True)
        if isinstance(status, int) and status >= 500:
            return KaggleError(f"Kaggle failed while {doing} ({status} server error): retry later",
                               f"{status} Kaggle server error: retry later", transient=True)
        return KaggleError(f"Kaggle answered {status} while {doing}: check the slug '{slug}' and the file, then retry",
                           f"{status} from Kaggle")
    detail = _scrub(str(info.get("detail") or "unknown error"))[:200]
    return KaggleError(f"the Kaggle client failed while {doing}: {detail}", f"client error: {detail}")
