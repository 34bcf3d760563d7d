"""Kaggle: download a competition's data (safely unzipped), submit a CSV, list submissions, wait for a score.

This is the only module that imports the official `kaggle` client, and it never imports it in the ens process:
every call runs the client in a short-lived child Python process (`python -c ...` back into this module), because

* `import kaggle` authenticates at import time (and with an access token it makes a network call then);
* the client sets no timeouts anywhere (its requests sessions send with `timeout=None`, the upload PUT retries
  connection errors ten times with back-off), so a server that accepts the connection and never answers would
  hang ens for ever. A child process can be killed: the parent waits for it with a deadline and kills it when
  the deadline passes, which bounds every call however the client behaves;
* the client prints to stdout (auth help, warnings); the child moves its stdout to stderr and hands its result
  back as one JSON line on the original stdout, so nothing the client prints reaches ens's output.

Failures come back as `KaggleError`: one line naming the problem and the fix, never a traceback or a secret.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import glob
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from .errors import EnsError
from .util import file_lock, lock_file_for, owner_tag, sweep_dead

RULES_URL = "https://www.kaggle.com/competitions/{slug}/rules"
TOKEN_URL = "https://www.kaggle.com/settings/api"
CREDENTIALS_HELP = ("save your API token as ~/.kaggle/kaggle.json ({\"username\": ..., \"key\": ...}), "
                    "or set KAGGLE_USERNAME and KAGGLE_KEY, or KAGGLE_API_TOKEN "
                    f"(create one at {TOKEN_URL})")

DOWNLOAD_TIMEOUT = 120.0  # seconds without a new downloaded byte (a big download may take longer in all)
SUBMIT_TIMEOUT = 300.0    # seconds for the whole submission (start, upload, create)
CALL_TIMEOUT = 60.0       # seconds for a listing or a limits call
# $ENS_KAGGLE_TIMEOUT caps all three (see _call)

_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_PARTIAL = ".partial-"    # marks temporary siblings: .<name>.partial-<pid>-<random>


class KaggleError(EnsError):
    """A Kaggle call that failed. `str(error)` is one line naming the problem and the fix; `reason` is a short
    form for the submission history; `transient` is True when the same call may well succeed later; `kind` and
    `detail` say how the call failed (the child's classification, or 'timeout' / 'crashed' in the parent), from
    which `submit` judges `maybe_submitted`."""

    def __init__(self, message: str, reason: str | None = None, transient: bool = False, kind: str | None = None,
                 detail: str = ""):
        super().__init__(message)  # one line: EnsError collapses the whitespace
        self.reason = " ".join(str(reason or self).split())
        self.transient = transient
        self.kind, self.detail = kind, detail
        self.maybe_submitted = False


# ---------------------------------------------------------------------------------------------------------------
# public functions


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


def safe_extract(zip_path: Path, dest: Path) -> Path:
    """Extract `zip_path` into `dest` (replacing it) or refuse the whole archive.

    Every entry is checked before anything is written: an absolute path, a drive letter, a `..` component, a
    symlink or a special file (device, fifo) rejects the archive with a KaggleError and nothing is extracted.
    Extraction goes to a temporary sibling renamed into place at the end, so `dest` is never half-extracted."""
    return _extract(Path(zip_path), Path(dest), str(zip_path))


def _extract(zip_path: Path, dest: Path, label: str) -> Path:
    """safe_extract, naming the archive `label` in errors."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as e:
        raise KaggleError(f"{label} is not a readable zip archive ({type(e).__name__}); download it again",
                          "bad zip archive") from None
    with archive:
        for info in archive.infolist():
            problem = _unsafe_entry(info)
            if problem:
                raise KaggleError(f"{label}: entry '{info.filename}' {problem}; the archive was rejected and "
                                  f"nothing was extracted into {dest} (download the data from the competition's page)",
                                  f"unsafe archive entry '{info.filename}': {problem}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        _sweep_partials(dest)
        tmp = _partial_path(dest, "unzip")
        try:
            tmp.mkdir()
            root = tmp.resolve()
            for info in archive.infolist():
                target = root.joinpath(*_parts(info.filename))
                if not target.resolve().is_relative_to(root):  # belt and braces after _unsafe_entry
                    raise KaggleError(f"{label}: entry '{info.filename}' would land outside {dest}; the archive "
                                      "was rejected", f"unsafe archive entry '{info.filename}'")
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(target, "xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
            _replace_dir(tmp, dest)
        except KaggleError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except (OSError, zipfile.BadZipFile, EOFError, RuntimeError) as e:  # disk full, corrupt member, CRC error
            shutil.rmtree(tmp, ignore_errors=True)
            detail = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
            raise KaggleError(f"{label}: extraction failed ({detail}); {dest} was left as it was: free disk space "
                              "or download again", f"extraction failed: {detail}") from None
    return dest


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


# ---------------------------------------------------------------------------------------------------------------
# code competitions: the competition's facts, a dataset of weights, a kernel (notebook) and its code submission

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


def push_kernel(folder: Path, timeout: float = CALL_TIMEOUT) -> dict:
    """Push the notebook described by `folder`/kernel-metadata.json as a new version, which Kaggle then runs.
    {ref, version, url}. An `error` or any source Kaggle does not know (which the client prints and the server
    drops, running the notebook without it) is a KaggleError here."""
    meta = json.loads((Path(folder) / "kernel-metadata.json").read_text())
    return _call("push_kernel", {"folder": str(folder)}, timeout, f"pushing notebook {meta['id']}", meta["id"],
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


def submit_code(slug: str, kernel: str, version: int, name: str, message: str,
                timeout: float = SUBMIT_TIMEOUT) -> str:
    """Submit version `version` of notebook `kernel` to the code competition `slug` (Kaggle re-runs it on the
    hidden test set and scores its file `name`); the submission's ref (as text)."""
    _check_slug(slug)
    result = _call("submit_code", {"slug": slug, "kernel": kernel, "version": int(version), "name": name,
                                   "message": message}, timeout,
                   f"submitting notebook {kernel} version {version} to '{slug}'", slug)
    return str(result["ref"])


# ---------------------------------------------------------------------------------------------------------------
# helpers of the parent (ens) side


def _check_slug(slug: str) -> None:
    if not isinstance(slug, str) or not _SLUG.fullmatch(slug):
        raise KaggleError(f"'{slug}' is not a Kaggle competition slug: use the part after /competitions/ in the "
                          "competition's URL, e.g. paddy-disease-classification", "bad slug")


def _partial_path(dest: Path, what: str) -> Path:
    return dest.parent / f".{dest.name}{_PARTIAL}{what}-{owner_tag()}"


def _sweep_partials(dest: Path) -> None:
    """Remove the temporary siblings of `dest` left by processes of this host that no longer run."""
    sweep_dead(dest.parent, [f".{glob.escape(dest.name)}{_PARTIAL}*-{{owner}}"])


def _replace_dir(tmp: Path, dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        old = _partial_path(dest, "old")
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


def _parts(name: str) -> list[str]:
    return [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]


def _unsafe_entry(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is a special file"
    unified = name.replace("\\", "/")
    if "\x00" in name:
        return "has a NUL byte in its name"
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified) or PurePosixPath(unified).is_absolute():
        return "has an absolute path that would land outside the destination"
    if ".." in unified.split("/"):
        return "has a '..' component that would land outside the destination"
    if not _parts(name):
        return "has an empty name"
    return None


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


def _dir_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _call(op: str, args: dict, timeout: float, doing: str, slug: str, progress_dir: Path | None = None,
          not_found: str | None = None):
    """Run `op` in a child process with the real client; its result, or a KaggleError. Without `progress_dir` the
    child is killed `timeout` s after it started; with it, after `timeout` s without the folder growing.
    $ENS_KAGGLE_TIMEOUT (seconds), when set, caps every such limit."""
    if os.environ.get("ENS_KAGGLE_TIMEOUT"):
        timeout = min(timeout, float(os.environ["ENS_KAGGLE_TIMEOUT"]))
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
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


# ---------------------------------------------------------------------------------------------------------------
# the child process: the only place `kaggle` is imported


class _ChildFailure(Exception):
    def __init__(self, **info):
        super().__init__(info.get("kind"))
        self.info = info


def _child_main() -> None:
    """Entry point of the child: argv = [op, json args]; writes {"ok": result} or {"error": info} as one line."""
    result_stream = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever the client prints goes to stderr, never into the result
    op, args = sys.argv[1], json.loads(sys.argv[2])
    try:
        result = {"ok": _CHILD_OPS[op](**args)}
    except _ChildFailure as e:
        result = {"error": e.info}
    except BaseException as e:  # noqa: BLE001 - everything is reported to the parent as data
        result = {"error": _classify(e)}
    result_stream.write(json.dumps(result) + "\n")
    result_stream.flush()


def _classify(e: BaseException) -> dict:
    try:
        import requests
        import urllib3
    except ImportError:  # pragma: no cover
        requests = urllib3 = None
    if requests is not None:
        response = getattr(e, "response", None)
        if isinstance(e, requests.exceptions.HTTPError) and response is not None:  # Response is falsy on errors
            return {"kind": "http", "status": int(response.status_code)}
        if isinstance(e, (requests.exceptions.Timeout, urllib3.exceptions.TimeoutError)):
            return {"kind": "timeout"}
        if isinstance(e, (requests.exceptions.ConnectionError, urllib3.exceptions.HTTPError, ConnectionError)):
            text = str(e).lower()
            detail = ("connection refused" if "refused" in text else
                      "name not resolved" if "resolve" in text or "name or service" in text else
                      "connection closed" if "closed" in text or "aborted" in text or "reset" in text else
                      "connection failed")
            return {"kind": "connection", "detail": detail}
    if isinstance(e, SystemExit):
        return {"kind": "nocreds"}
    first = (str(e).splitlines() or [""])[0]
    return {"kind": "other", "detail": _child_scrub(f"{type(e).__name__}: {first}")}


def _child_scrub(text: str) -> str:
    secrets = _secrets()
    try:
        import kaggle

        secrets += [v for k, v in kaggle.api.config_values.items() if k in ("key", "token", "api_token") and v]
    except Exception:  # noqa: BLE001
        pass
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def _api():
    """The authenticated client, or _ChildFailure(nocreds / badtoken)."""
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):  # `import kaggle` authenticates and prints help when it cannot
        import kaggle
    api = kaggle.api
    if getattr(api, "_authenticated", False):
        return api
    from kagglesdk.kaggle_env import get_access_token_from_env

    try:
        with redirect_stdout(io.StringIO()):
            api.authenticate()  # again, to let a 401 from the token check surface as an HTTPError
    except SystemExit:
        token, source = get_access_token_from_env()
        if token:
            raise _ChildFailure(kind="badtoken", source={"access_token": "~/.kaggle/access_token"}.get(source, source))
        raise _ChildFailure(kind="nocreds")
    return api


def _child_download(slug: str, folder: str) -> list[str]:
    api = _api()
    api.competition_download_files(slug, path=folder, force=True, quiet=True)
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file())


def _child_submit(slug: str, csv: str, message: str) -> dict:
    api = _api()
    response = api.competition_submit(csv, message, slug, quiet=True)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:  # returned, not raised, by the client
        raise _ChildFailure(kind="upload")
    ref = response.ref
    if not ref:  # an older server without `ref` in CreateSubmission: find the submission just made
        for sub in api.competition_submissions(slug) or []:
            if sub.file_name == os.path.basename(csv) and (sub.description or "") == (message or ""):
                ref = sub.ref
                break
    if not ref:
        raise _ChildFailure(kind="noref", detail=f"Kaggle accepted the file but gave no submission ref "
                                                 f"({_child_scrub(response.message or '')[:120]})")
    return {"ref": str(ref), "message": response.message}


def _child_list(slug: str) -> list[dict]:
    api = _api()
    result = []
    for sub in api.competition_submissions(slug) or []:
        if sub is None:
            continue
        score = sub.public_score
        try:
            score = float(score) if score not in (None, "") else None
        except ValueError:
            score = None
        status = getattr(sub.status, "name", str(sub.status)).lower().replace("submission_status_", "")
        result.append({
            "ref": str(sub.ref),
            "date": sub.date.isoformat() if sub.date else None,
            "description": sub.description or "",
            "file_name": sub.file_name or "",
            "status": status,
            "public_score": score,
            "error_description": sub.error_description or "",
        })
    return result


def _child_limits(slug: str) -> dict:
    api = _api()
    limits = api.competition_get_submission_limits(slug)
    return {"num_today": limits.num_today, "num_total": limits.num_total, "num_allowed_now": limits.num_allowed_now,
            "limited_by_total": limits.limited_by_total}


def _child_info(slug: str) -> dict:
    from kagglesdk.competitions.types.competition_api_service import ApiGetCompetitionRequest

    api = _api()
    request = ApiGetCompetitionRequest()
    request.competition_name = slug
    with api.build_kaggle_client() as client:
        comp = client.competitions.competition_api_client.get_competition(request)
    return {"title": comp.title or "", "evaluation_metric": comp.evaluation_metric or "",
            "kernels_only": bool(comp.is_kernels_submissions_only)}


def _child_whoami() -> str:
    api = _api()
    name = api.config_values.get(api.CONFIG_NAME_USER)
    if not name:
        raise _ChildFailure(kind="other", detail="the credentials name no Kaggle user: set KAGGLE_USERNAME")
    return name


def _owned(api, dataset: str) -> bool:
    import requests

    try:
        api.dataset_status(dataset)
    except requests.exceptions.HTTPError:  # how the client itself tells a new dataset (dataset_create_new)
        return False
    return True


def _child_push_dataset(folder: str, dataset: str, title: str, notes: str) -> dict:
    api = _api()
    meta = {"title": title, "id": dataset, "licenses": [{"name": "CC0-1.0"}]}
    (Path(folder) / "dataset-metadata.json").write_text(json.dumps(meta))
    created = not _owned(api, dataset)
    if created:
        response = api.dataset_create_new(folder, public=False, quiet=True, convert_to_csv=False)
    else:
        response = api.dataset_create_version(folder, notes, quiet=True, convert_to_csv=False)
    if response.invalid_tags:
        raise _ChildFailure(kind="refused", detail=f"invalid tags {', '.join(response.invalid_tags)}")
    if (response.status or "").lower() != "ok":
        raise _ChildFailure(kind="refused", detail=response.error or f"status '{response.status}'")
    return {"ref": response.ref or dataset, "created": created}


def _child_dataset_status(dataset: str) -> str:
    return str(_api().dataset_status(dataset)).lower()


def _child_dataset_version(dataset: str) -> int:
    answer = _api().dataset_status(dataset, format="json(current_version_number)")
    return int(json.loads(answer)["current_version_number"])


def _child_dataset_files(dataset: str) -> dict:
    api, files, token = _api(), {}, None
    while True:
        response = api.dataset_list_files(dataset, page_token=token, page_size=200)
        if response.error_message:
            raise _ChildFailure(kind="refused", detail=response.error_message)
        files.update({f.name: int(f.total_bytes or 0) for f in response.files or []})
        token = response.next_page_token
        if not token:
            return files


def _child_push_kernel(folder: str) -> dict:
    api = _api()
    response = api.kernels_push(folder)
    if response.error:
        raise _ChildFailure(kind="refused", detail=response.error)
    invalid = {what: list(getattr(response, f"invalid_{what}_sources") or [])
               for what in ("dataset", "competition", "kernel", "model")}
    invalid = {what: names for what, names in invalid.items() if names}
    if invalid:
        listed = "; ".join(f"{what} {', '.join(names)}" for what, names in invalid.items())
        raise _ChildFailure(kind="refused", detail=f"unknown sources ({listed}): the notebook would run without "
                                                   "them")
    return {"ref": response.ref, "version": int(response.version_number or 0), "url": response.url or ""}


def _child_kernel_status(kernel: str, version: int) -> dict:
    response = _api().kernels_status(f"{kernel}/{version}")
    status = getattr(response.status, "name", str(response.status)).lower().replace("kernel_worker_status_", "")
    return {"status": status, "failure": response.failure_message or ""}


def _child_kernel_output(kernel: str, version: int, name: str, folder: str) -> list[str]:
    api = _api()
    files, _ = api.kernels_output(f"{kernel}/{version}", folder, file_pattern=f"^{re.escape(name)}$", force=True,
                                  quiet=True)
    return [str(f) for f in files or []]


def _child_submit_code(slug: str, kernel: str, version: int, name: str, message: str) -> dict:
    api = _api()
    response = api.competition_submit_code(name, message, slug, kernel=kernel, kernel_version=version, quiet=True)
    if not response.ref:
        raise _ChildFailure(kind="refused", detail=response.message or "no submission ref in Kaggle's answer")
    return {"ref": str(response.ref), "message": response.message}


_CHILD_OPS = {"download": _child_download, "submit": _child_submit, "list": _child_list, "limits": _child_limits,
              "info": _child_info, "whoami": _child_whoami, "push_dataset": _child_push_dataset,
              "dataset_status": _child_dataset_status, "dataset_files": _child_dataset_files,
              "dataset_version": _child_dataset_version,
              "push_kernel": _child_push_kernel, "kernel_status": _child_kernel_status,
              "kernel_output": _child_kernel_output, "submit_code": _child_submit_code}
