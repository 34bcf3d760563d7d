"""A fake Kaggle API server for the tests: the real `kaggle` client talks to it as it would to api.kaggle.com.

The client is pointed at it with `KAGGLE_API_ENVIRONMENT=LOCALHOST` (requests go to http://localhost/api/v1/...)
and `HTTP_PROXY=http://127.0.0.1:PORT` (so they all arrive here, as absolute-URI proxy requests); `env()` gives
the variables. It checks what Kaggle would check: the credentials (HTTP basic username:key, or a bearer token),
the competition's name (on competition RPCs), the uploaded bytes against the announced length; it scores a
submitted CSV (accuracy on `answers`), answers PENDING to the first `pending_polls` listings of a new submission
and then COMPLETE, serves DownloadDataFiles as a redirect to a zip, and can be told to fail (`fail`), or to hang
(`hang`). For code competitions it keeps datasets, runs pushed kernels as local Python processes (see "Runner"
below), and scores a code submission by re-running its kernel on a hidden test set.

Endpoints (POST, JSON, /api/v1/<service>/<Method>; `docs/code-competitions-wire.md` has the wire details):
  competitions.CompetitionApiService: StartSubmissionUpload -> {token, createUrl}; CreateSubmission -> {message,
    ref} (400 on a `kernels_only` competition); ListSubmissions -> {submissions: [...]}; GetSubmission {ref} -> one
    submission; GetSubmissionLimits -> {numToday, numTotal, numAllowedNow, limitedByTotal}; DownloadDataFiles -> 302
    to /files/<slug>.zip; GetCompetition -> {ref, title, evaluationMetric, isKernelsSubmissionsOnly,
    maxDailySubmissions}; CreateCodeSubmission {kernelOwner, kernelSlug, kernelVersion, fileName} -> {message, ref}.
    All but GetSubmission answer 404 unless `competitionName` is the fake's `slug`.
  blobs.BlobApiService/StartBlobUpload -> {token, createUrl} (a dataset file: the name and size are kept).
  datasets.DatasetApiService: CreateDataset, CreateDatasetVersion -> {ref, url, status: "ok"} or {status: "error",
    error}; GetDatasetStatus -> {status} (HTTP 404 for an unknown dataset); ListDatasetFiles -> {datasetFiles};
    GetDataset -> {ref, title, currentVersionNumber, isPrivate}.
  kernels.KernelsApiService: GetAcceleratorQuotaStatistics -> {gpuQuota: {timeUsed, totalTimeAllowed}, quotaRefreshTime}
    (404 unless `gpu_quota_hours` says); SaveKernel -> {ref, url, versionNumber, kernelId[, invalid*Sources]} or {error}, and
    starts the run; GetKernelSessionStatus -> {status[, failureMessage]}; ListKernelSessionOutput -> {files: [{fileName,
    url}], log} (never a nextPageToken).
  security.OAuthService/IntrospectToken (the client checks an access token with it).
Without auth: PUT /upload/<token> takes a file (an empty PUT with `Content-Range: bytes */N` is the client's resume
probe: 200 when those bytes are stored, 404 otherwise); GET /files/<slug>.zip gives the zip; GET
/kernel-output/<owner>/<slug>/<version>/<quoted name> gives a file of a run's output.

Runner (how the fake "runs a notebook"): every SaveKernel (unless QUICK_SAVE) starts a *push run* of the pushed code
in a background thread, every CreateCodeSubmission a *rerun* of that kernel version. A run gets a fresh folder R under
`runs_dir` holding a Kaggle-like tree:
  R/kaggle/input/<competition slug>  -> symlink to `public_data` (push run) or `hidden_data` (rerun; `public_data`
                                        when `hidden_data` is None); absent when that is None
  R/kaggle/input/<dataset slug>/...  the files of each dataset source (the slug part only, after the owner), in the
                                     version named in the source or else the latest one at push time (the rerun
                                     uses the same versions as the push run)
  R/kaggle/working/                  the cwd; holds __notebook__.py (the script, or a notebook's code cells joined);
                                     its other top-level files are the run's output
and runs `[python, "__notebook__.py"]` there, with the current environment minus every *_PROXY and KAGGLE_*
variable, plus ENS_KAGGLE_ROOT=R/kaggle (generated scripts use `os.environ.get("ENS_KAGGLE_ROOT", "/kaggle")`),
KAGGLE_KERNEL_RUN_TYPE=Batch and, in a rerun, KAGGLE_IS_COMPETITION_RERUN=True (as Kaggle sets it). When the kernel
was pushed with enableInternet false, R/_nonet/sitecustomize.py goes first on PYTHONPATH: it makes
`socket.socket.connect`/`connect_ex` raise OSError("network is disabled in this notebook") for AF_INET/AF_INET6
(a Python started with -I/-S escapes it; the fake is no sandbox). A run ends COMPLETE on exit 0, else ERROR with
`failureMessage` = the last line of stderr, or "timeout" after `run_timeout` (push) / `rerun_timeout` (rerun)
seconds, or the push's `sessionTimeoutSeconds` when shorter (the whole process group is killed). Each run is a `Run` in `runs` (kind, returncode, stdout, stderr,
seconds, inputs = files under R/kaggle/input relative to it, outputs()).
A code submission stays PENDING until its rerun ends, then is COMPLETE with the score of its `fileName` against
`hidden_answers` (or `answers` when that is empty), or ERROR with Kaggle's error classes: "Notebook Threw Exception",
"Notebook Timeout", "Submission CSV Not Found", "Submission Scoring Error: <why>". CreateCodeSubmission itself answers
404 for an unknown kernel or version (no kernelVersion: the latest), and 400 when that version was pushed with
internet on ("Notebook internet must be disabled for this competition"), its push run is not COMPLETE (still running
included), or its output lacks `fileName`. ListKernelSessionOutput lists whatever the working folder holds, even while
the run is still going.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

ENDPOINTS = ("StartSubmissionUpload", "upload", "CreateSubmission", "ListSubmissions", "GetSubmissionLimits",
             "DownloadDataFiles", "files", "IntrospectToken", "GetCompetition", "CreateCodeSubmission",
             "GetSubmission", "StartBlobUpload", "CreateDataset", "CreateDatasetVersion", "GetDatasetStatus",
             "ListDatasetFiles", "GetDataset", "SaveKernel", "GetKernelSessionStatus", "ListKernelSessionOutput", "kernel-output")
NO_AUTH = ("upload", "files", "kernel-output", "IntrospectToken")  # the client sends no Kaggle credentials there
NOTEBOOK = "__notebook__.py"
LOG_LIMIT = 100_000  # characters of a run's stdout+stderr kept in ListKernelSessionOutput's log (the tail)

NO_NETWORK = '''\
"""Written by the fake Kaggle: this notebook runs with internet disabled (enableInternet false)."""
import socket as _socket

_connect, _connect_ex = _socket.socket.connect, _socket.socket.connect_ex


def _refuse(self):
    if self.family in (_socket.AF_INET, _socket.AF_INET6):
        raise OSError("network is disabled in this notebook")


def connect(self, address):
    _refuse(self)
    return _connect(self, address)


def connect_ex(self, address):
    _refuse(self)
    return _connect_ex(self, address)


_socket.socket.connect, _socket.socket.connect_ex = connect, connect_ex
'''


@dataclass
class Recorded:
    method: str
    endpoint: str          # one of ENDPOINTS (or the last path segment)
    path: str
    headers: dict
    body: bytes
    json: dict | None = None


@dataclass
class Run:
    """One execution of a kernel version: `kind` "push" (public data) or "rerun" (hidden data, for a submission)."""
    kernel: str                  # owner/slug
    version: int
    kind: str
    root: Path                   # R: R/kaggle/input, R/kaggle/working
    inputs: list[str] = field(default_factory=list)  # files under R/kaggle/input, relative to it, sorted
    status: str = "QUEUED"       # QUEUED, RUNNING, COMPLETE, ERROR
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float | None = None
    timed_out: bool = False
    failure: str = ""            # failureMessage when ERROR
    done: threading.Event = field(default_factory=threading.Event)
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def working(self) -> Path:
        return self.root / "kaggle" / "working"

    def outputs(self) -> dict[str, Path]:
        """The run's output files: the top-level files of its working folder (not the notebook itself)."""
        if not self.working.is_dir():
            return {}
        return {p.name: p for p in sorted(self.working.iterdir()) if p.is_file() and p.name != NOTEBOOK}

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


@dataclass
class KernelVersion:
    ref: str                     # owner/slug
    number: int
    text: str
    language: str
    kernel_type: str             # script | notebook
    enable_internet: bool
    enable_gpu: bool
    dataset_sources: list[str]   # as pushed, the invalid ones left out
    competition_sources: list[str]
    dataset_versions: dict[str, int]  # owner/slug -> the version mounted (resolved at push time)
    request: dict
    run: Run | None = None       # the push run (None for a QUICK_SAVE)

    @property
    def code(self) -> str:
        if self.kernel_type != "notebook":
            return self.text
        try:
            cells = json.loads(self.text).get("cells", [])
        except ValueError:
            return self.text
        sources = ["".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")
                   for c in cells if c.get("cell_type") == "code"]
        return "\n\n".join(sources) + "\n"


@dataclass
class Submission:
    ref: int
    date: datetime
    description: str
    file_name: str
    content: bytes               # a code submission: the push run's file, replaced by the rerun's once scored
    score: float | None
    error: str | None
    polls: int = 0
    kernel: str | None = None    # a code submission: owner/slug, version, and its rerun
    kernel_version: int | None = None
    rerun: Run | None = None
    scored: bool = True          # False while a code submission's rerun runs (it is listed PENDING)


class FakeKaggle:
    """State and knobs of the fake server. Start with `start()` (or the `fake_kaggle` fixture), stop with `stop()`.

    Knobs: `fail[endpoint] = status` makes that endpoint (or "*" for all) answer `status` (401, 403, 404, 429,
    500, ...; for "upload" the PUT of the file); `hang` is a set of endpoints (or {"*"}) that accept the request
    and never answer; `mute` a set of endpoints that do their work and then never answer (the answer lost: a
    time-out after Kaggle took the request; `muted` is set when one did); `data_zip` the bytes served as the competition's data; `answers` id -> label; `pending_polls`
    how many ListSubmissions answer PENDING for a new submission; `daily_limit` for GetSubmissionLimits.
    Competition: `title`, `evaluation_metric`, `kernels_only` (a CSV CreateSubmission then gets HTTP 400).
    Datasets: `dataset_ready_polls` how many GetDatasetStatus of a new version answer BLOBS_RECEIVED before READY;
    `gpu_quota_hours` (used, allowed) answers GetAcceleratorQuotaStatistics ((0, None): 404, no quota reported);
    `dataset_status` forces that status (e.g. "FAILED"); `drop_files` file names silently left out of every created
    version (the client still says "ok"); `dataset_error` makes CreateDataset/CreateDatasetVersion answer
    {"status": "error", "error": dataset_error}.
    Kernels: `kernel_error` makes SaveKernel answer 200 {"error": kernel_error}; `output_extra` name -> bytes added to
    every run's output listing (e.g. "../evil.csv"); `public_data`, `hidden_data` (folders), `hidden_answers` id ->
    label for the reruns, `python` the interpreter of the runs, `run_timeout`, `rerun_timeout` (s), `runs_dir`
    (default: a temporary folder removed by stop()).
    Records: `requests` every request received, `submissions` every submission made, `uploads` the uploaded bytes
    (token -> bytes), `datasets` "owner/slug" -> [version dicts {"version", "files": {name: bytes}, "title",
    "private", "notes", "date"}] (`add_dataset` stores one directly), `kernels` "owner/slug" -> [KernelVersion]
    (`kernel_version(ref, n)` finds one; its `.run` is the push run), `runs` every Run (`wait_runs()` waits)."""

    def __init__(self, slug: str = "digits", username: str = "alice", key: str = "s3cret-key-123",
                 token: str | None = None, answers: dict[str, str] | None = None, data_zip: bytes = b"",
                 pending_polls: int = 1, daily_limit: int = 5, *, kernels_only: bool = False,
                 public_data: Path | None = None, hidden_data: Path | None = None,
                 hidden_answers: dict[str, str] | None = None, runs_dir: Path | None = None):
        self.slug, self.username, self.key, self.token = slug, username, key, token
        self.answers = dict(answers or {})
        self.data_zip = data_zip
        self.pending_polls = pending_polls
        self.daily_limit = daily_limit
        self.fail: dict[str, int] = {}
        self.hang: set[str] = set()
        self.mute: set[str] = set()
        self.muted = threading.Event()  # set when a muted endpoint has done its work and withheld its answer
        self.requests: list[Recorded] = []
        self.submissions: list[Submission] = []
        self.uploads: dict[str, bytes] = {}
        # competition
        self.title = "Fake Digits"
        self.evaluation_metric = "Categorization Accuracy"
        self.kernels_only = kernels_only
        # datasets
        self.datasets: dict[str, list[dict]] = {}
        self.dataset_ready_polls = 0
        self.gpu_quota_hours: tuple = (0.0, None)  # (used, allowed) weekly GPU hours; allowed None: not reported
        self.dataset_status: str | None = None
        self.drop_files: set[str] = set()
        self.dataset_error: str | None = None
        # kernels and their runs
        self.kernels: dict[str, list[KernelVersion]] = {}
        self.kernel_error: str | None = None
        self.output_extra: dict[str, bytes] = {}
        self.public_data = Path(public_data) if public_data else None
        self.hidden_data = Path(hidden_data) if hidden_data else None
        self.hidden_answers = dict(hidden_answers or {})
        self.python = sys.executable
        self.run_timeout = 600.0
        self.rerun_timeout = 600.0
        self.runs_dir = Path(runs_dir) if runs_dir else None
        self.runs: list[Run] = []
        self._own_runs_dir: Path | None = None
        self._dataset_polls: dict[str, int] = {}
        self._pending_uploads: dict[str, dict] = {}
        self._refs = itertools.count(40_000_001)
        self._tokens = itertools.count(1)
        self._run_ids = itertools.count(1)
        self._lock = threading.Lock()
        self._release = threading.Event()
        self._stopping = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> "FakeKaggle":
        fake = self

        class Handler(_Handler):
            server_state = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()  # hung handlers return (without answering)
        self._stopping = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None
        for run in list(self.runs):  # kill the runs still going (their process groups), and wait for their threads
            if run.proc is not None and run.proc.poll() is None:
                _kill_group(run.proc)
        for run in list(self.runs):
            run.wait(timeout=10)
        if self._own_runs_dir is not None:
            shutil.rmtree(self._own_runs_dir, ignore_errors=True)
            self._own_runs_dir = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self, credentials: bool = True) -> dict[str, str]:
        """The environment the client needs to talk to this server (and, with `credentials`, the right key)."""
        env = {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": self.proxy, "http_proxy": self.proxy}
        if credentials:
            env.update(KAGGLE_USERNAME=self.username, KAGGLE_KEY=self.key)
        return env

    def endpoints(self) -> list[str]:
        return [r.endpoint for r in self.requests]

    # -- behaviour -------------------------------------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        if header.startswith("Basic "):
            try:
                user, _, key = base64.b64decode(header[6:]).decode().partition(":")
            except ValueError:
                return False
            return user == self.username and key == self.key
        if header.startswith("Bearer "):
            return self.token is not None and header[7:] == self.token
        return False

    def score(self, content: bytes, answers: dict[str, str] | None = None) -> tuple[float | None, str | None]:
        """Accuracy of the CSV's id -> last column against `answers` (default: `self.answers`), or (None, why)."""
        answers = self.answers if answers is None else answers
        try:
            rows = list(csv.reader(io.StringIO(content.decode("utf-8"))))
        except UnicodeDecodeError:
            return None, "the file is not UTF-8 text"
        if len(rows) < 2 or len(rows[0]) < 2:
            return None, "the file needs a header and an id and a label column"
        predicted = {row[0]: row[-1] for row in rows[1:] if row}
        if not answers:
            return None, None
        missing = [i for i in answers if i not in predicted]
        if missing:
            return None, f"ERROR: Could not find id '{missing[0]}' in the submission"
        return sum(predicted[i] == label for i, label in answers.items()) / len(answers), None

    def kernel_version(self, ref: str, number: int | None = None) -> KernelVersion | None:
        """Version `number` (default: the latest) of kernel owner/slug, or None."""
        versions = self.kernels.get(ref) or []
        if number is None:
            return versions[-1] if versions else None
        return versions[number - 1] if 1 <= number <= len(versions) else None

    def add_dataset(self, ref: str, files: dict[str, bytes], title: str = "A dataset") -> int:
        """Store a new version of dataset owner/slug directly (as if uploaded and READY); its version number."""
        with self._lock:
            versions = self.datasets.setdefault(ref, [])
            versions.append({"version": len(versions) + 1, "files": dict(files), "title": title, "private": True,
                             "notes": "", "date": datetime.now(timezone.utc).replace(tzinfo=None)})
            self._dataset_polls[ref] = self.dataset_ready_polls
            return len(versions)

    def wait_runs(self, timeout: float = 60) -> bool:
        """Wait until every run started so far has ended."""
        deadline = time.monotonic() + timeout
        return all(run.wait(max(0.0, deadline - time.monotonic())) for run in list(self.runs))

    # -- the runner --------------------------------------------------------------------------------------------

    def _runs_root(self) -> Path:
        if self.runs_dir is not None:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            return self.runs_dir
        if self._own_runs_dir is None:
            self._own_runs_dir = Path(tempfile.mkdtemp(prefix="fake-kaggle-runs-"))
        return self._own_runs_dir

    def _start_run(self, kv: KernelVersion, kind: str, on_end=None) -> Run:
        owner, slug = kv.ref.split("/", 1)
        root = self._runs_root() / f"{owner}-{slug}-v{kv.number}-{kind}-{next(self._run_ids)}"
        inputs, working = root / "kaggle" / "input", root / "kaggle" / "working"
        working.mkdir(parents=True)
        inputs.mkdir(parents=True, exist_ok=True)
        comp_data = self.public_data if kind == "push" else (self.hidden_data or self.public_data)
        for comp in kv.competition_sources:
            if comp_data is not None:
                (inputs / comp).symlink_to(Path(comp_data).resolve(), target_is_directory=True)
        for source in kv.dataset_sources:
            ref = "/".join(source.split("/")[:2])
            versions = self.datasets.get(ref) or []
            number = kv.dataset_versions.get(ref, len(versions))
            if not 1 <= number <= len(versions):
                continue
            folder = inputs / ref.split("/")[1]
            folder.mkdir(exist_ok=True)
            for name, data in versions[number - 1]["files"].items():
                (folder / name).write_bytes(data)
        (working / NOTEBOOK).write_text(kv.code, encoding="utf-8")
        run = Run(kv.ref, kv.number, kind, root)
        run.inputs = sorted(os.path.relpath(os.path.join(d, f), inputs).replace(os.sep, "/")
                            for d, _, files in os.walk(inputs, followlinks=True) for f in files)
        env = {k: v for k, v in os.environ.items()
               if not k.upper().startswith("KAGGLE_") and not k.upper().endswith("_PROXY")}
        env.update(ENS_KAGGLE_ROOT=str(root / "kaggle"), KAGGLE_KERNEL_RUN_TYPE="Batch")
        if kind == "rerun":
            env["KAGGLE_IS_COMPETITION_RERUN"] = "True"
        if not kv.enable_internet:
            (root / "_nonet").mkdir()
            (root / "_nonet" / "sitecustomize.py").write_text(NO_NETWORK)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "_nonet"), env.get("PYTHONPATH")) if p)
        timeout = self.run_timeout if kind == "push" else self.rerun_timeout
        if kv.request.get("sessionTimeoutSeconds"):  # the push's session timeout, under the fake's own limit
            timeout = min(timeout, float(kv.request["sessionTimeoutSeconds"]))
        with self._lock:
            self.runs.append(run)
        threading.Thread(target=self._execute, args=(run, kv, env, timeout, on_end), daemon=True).start()
        return run

    def _execute(self, run: Run, kv: KernelVersion, env: dict, timeout: float, on_end) -> None:
        started = time.monotonic()
        try:
            if kv.language != "python":
                run.returncode, run.stderr = 1, f"the fake runs python only, not {kv.language}"
            elif self._stopping:
                run.returncode, run.stderr = -9, "the fake server stopped"
            else:
                run.proc = subprocess.Popen([self.python, NOTEBOOK], cwd=run.working, env=env,
                                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            start_new_session=True)
                run.status = "RUNNING"
                try:
                    out, err = run.proc.communicate(timeout=timeout)
                except subprocess.TimeoutExpired:
                    run.timed_out = True
                    _kill_group(run.proc)
                    out, err = run.proc.communicate()
                run.returncode = run.proc.returncode
                run.stdout, run.stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
        except Exception as e:  # noqa: BLE001 - a run that cannot start is an ERROR, not a dead thread
            run.returncode, run.stderr = -1, f"{type(e).__name__}: {e}"
        run.seconds = time.monotonic() - started
        if run.returncode == 0 and not run.timed_out:
            run.status = "COMPLETE"
        else:
            lines = [line for line in run.stderr.splitlines() if line.strip()]
            run.failure = "timeout" if run.timed_out else (lines[-1] if lines else f"exit code {run.returncode}")
            run.status = "ERROR"
        try:
            if on_end is not None:
                on_end(run)
        finally:
            run.done.set()

    def _score_rerun(self, sub: Submission, run: Run) -> None:
        score, error, content = None, None, sub.content
        if run.timed_out:
            error = "Notebook Timeout"
        elif run.returncode != 0:
            error = "Notebook Threw Exception"
        elif sub.file_name not in run.outputs():
            error = "Submission CSV Not Found"
        else:
            content = run.outputs()[sub.file_name].read_bytes()
            score, why = self.score(content, self.hidden_answers or self.answers)
            if why:
                error = "Submission Scoring Error: " + why.removeprefix("ERROR: ")
        with self._lock:
            sub.score, sub.error, sub.content, sub.scored = score, error, content, True


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class _Handler(BaseHTTPRequestHandler):
    server_state: FakeKaggle
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, payload: dict | bytes | None = None, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        body = json.dumps(payload).encode() if isinstance(payload, dict) else (payload or b"")
        fake = self.server_state
        if getattr(self, "_endpoint", None) in fake.mute:  # done, and the answer never sent
            fake.muted.set()
            fake._release.wait(timeout=60)
            self.close_connection = True
            return
        self.send_response(status)
        if body or content_type != "application/json":
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"code": status, "message": message})

    def _handle(self, method: str) -> None:
        fake = self.server_state
        path = urlsplit(self.path).path
        parts = [p for p in path.split("/") if p]
        endpoint = parts[-1] if parts else ""
        if len(parts) >= 2 and parts[0] in ("upload", "files", "kernel-output"):
            endpoint = parts[0]
        body = self._body()
        try:
            payload = json.loads(body) if body and method == "POST" else None
        except ValueError:
            payload = None
        with fake._lock:
            fake.requests.append(Recorded(method, endpoint, path, dict(self.headers), body, payload))
        self._endpoint = endpoint
        if endpoint in fake.hang or "*" in fake.hang:
            fake._release.wait(timeout=60)  # accept, read, and never answer
            self.close_connection = True
            return
        status = fake.fail.get(endpoint) or (fake.fail.get("*") if endpoint != "IntrospectToken" else None)
        if status:
            return self._error(status, f"fake failure {status} on {endpoint}")
        handler = getattr(self, f"_ep_{endpoint.replace('-', '_')}", None)
        if handler is None:
            return self._error(404, f"no such endpoint {path}")
        if endpoint not in NO_AUTH and not fake.authorized(self.headers.get("Authorization")):
            return self._error(401, "Unauthenticated")
        if (len(parts) >= 3 and parts[:2] == ["api", "v1"] and parts[2] == "competitions.CompetitionApiService"
                and endpoint != "GetSubmission"):  # a submission's ref is global: GetSubmission sends only {ref}
            name = (payload or {}).get("competitionName")
            if name != fake.slug:
                return self._error(404, f"Competition '{name}' not found")
        return handler(payload or {}, body, parts)

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_GET(self):
        self._handle("GET")

    # -- endpoints: competitions -----------------------------------------------------------------------------------

    def _ep_IntrospectToken(self, payload, body, parts):
        fake = self.server_state
        if fake.token is not None and payload.get("token") == fake.token:
            return self._send(200, {"active": True, "username": fake.username, "clientId": "kaggle-cli"})
        return self._send(200, {"active": False})

    def _ep_GetCompetition(self, payload, body, parts):
        fake = self.server_state
        self._send(200, {"ref": fake.slug, "title": fake.title,
                         "url": f"https://www.kaggle.com/competitions/{fake.slug}",
                         "evaluationMetric": fake.evaluation_metric, "isKernelsSubmissionsOnly": fake.kernels_only,
                         "maxDailySubmissions": fake.daily_limit})

    def _ep_StartSubmissionUpload(self, payload, body, parts):
        fake = self.server_state
        with fake._lock:
            token = f"blob-{next(fake._tokens)}"
            fake._pending_uploads[token] = {"file_name": payload.get("fileName", ""),
                                            "length": int(payload.get("contentLength", 0))}
        self._send(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})

    def _ep_StartBlobUpload(self, payload, body, parts):
        fake = self.server_state
        with fake._lock:
            token = f"blob-{next(fake._tokens)}"
            fake._pending_uploads[token] = {"file_name": payload.get("name", ""), "type": payload.get("type", ""),
                                            "length": int(payload.get("contentLength", 0))}
        self._send(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})

    def _ep_upload(self, payload, body, parts):
        fake = self.server_state
        token = parts[1]
        pending = fake._pending_uploads.get(token)
        if pending is None:
            return self._send(404, b"unknown upload", "text/plain")
        probe = self.headers.get("Content-Range", "")
        if not body and probe.startswith("bytes */"):  # the client's resume probe: is it all there?
            stored = fake.uploads.get(token)
            if stored is not None and str(len(stored)) == probe[len("bytes */"):].strip():
                return self._send(200, b"", "text/plain")
            return self._send(404, b"upload expired", "text/plain")
        if len(body) != pending["length"]:
            return self._send(400, b"length differs from the announced contentLength", "text/plain")
        fake.uploads[token] = body
        self._send(200, b"", "text/plain")

    def _ep_CreateSubmission(self, payload, body, parts):
        fake = self.server_state
        if fake.kernels_only:
            return self._error(400, "This competition only accepts submissions from notebooks")
        token = payload.get("blobFileTokens", "")
        if token not in fake.uploads:
            return self._error(400, "blobFileTokens: no uploaded file")
        content = fake.uploads[token]
        score, error = fake.score(content)
        with fake._lock:
            sub = Submission(next(fake._refs), datetime.now(timezone.utc).replace(tzinfo=None),
                             payload.get("submissionDescription", ""), fake._pending_uploads[token]["file_name"],
                             content, score, error)
            fake.submissions.append(sub)
        self._send(200, {"message": f"Successfully submitted to {fake.title}", "ref": sub.ref})

    def _ep_CreateCodeSubmission(self, payload, body, parts):
        fake = self.server_state
        ref = f"{payload.get('kernelOwner', '')}/{payload.get('kernelSlug', '')}"
        number = payload.get("kernelVersion")
        kv = fake.kernel_version(ref, int(number) if number else None)
        if kv is None:
            return self._error(404, f"Notebook {ref} version {number or 'latest'} not found")
        file_name = payload.get("fileName", "")
        run = kv.run
        if kv.enable_internet:
            return self._error(400, "Notebook internet must be disabled for this competition")
        if run is None or run.status != "COMPLETE":
            state = "was never run" if run is None else ("is still running" if not run.done.is_set()
                                                         else "failed")
            return self._error(400, f"Notebook {ref} version {kv.number} {state}: only a successful run can be "
                                    "submitted")
        if file_name not in run.outputs():
            return self._error(400, f"Notebook {ref} version {kv.number} has no output file '{file_name}'")
        with fake._lock:
            sub = Submission(next(fake._refs), datetime.now(timezone.utc).replace(tzinfo=None),
                             payload.get("submissionDescription", ""), file_name,
                             run.outputs()[file_name].read_bytes(), None, None, kernel=ref, kernel_version=kv.number,
                             scored=False)
            fake.submissions.append(sub)
        sub.rerun = fake._start_run(kv, "rerun", on_end=lambda r: fake._score_rerun(sub, r))
        self._send(200, {"message": f"Successfully submitted to {fake.title}", "ref": sub.ref})

    def _submission_item(self, sub: Submission) -> dict:
        """One ApiSubmission; counts a poll (PENDING for the first `pending_polls`, and while a rerun runs)."""
        fake = self.server_state
        sub.polls += 1
        item = {"ref": sub.ref, "totalBytes": len(sub.content),
                "date": sub.date.isoformat(timespec="milliseconds") + "Z", "description": sub.description,
                "fileName": sub.file_name, "submittedBy": fake.username, "teamName": fake.username, "status": "PENDING"}
        if sub.polls > fake.pending_polls and sub.scored:
            if sub.error:
                item.update(status="ERROR", errorDescription=sub.error)
            else:
                item.update(status="COMPLETE", publicScore=f"{sub.score:.5f}" if sub.score is not None else "")
        return item

    def _ep_ListSubmissions(self, payload, body, parts):
        fake = self.server_state
        with fake._lock:
            items = [self._submission_item(sub) for sub in sorted(fake.submissions, key=lambda s: s.ref, reverse=True)]
        self._send(200, {"submissions": items})

    def _ep_GetSubmission(self, payload, body, parts):
        fake = self.server_state
        with fake._lock:
            found = [s for s in fake.submissions if str(s.ref) == str(payload.get("ref"))]
            item = self._submission_item(found[0]) if found else None
        if item is None:
            return self._error(404, f"Submission {payload.get('ref')} not found")
        self._send(200, item)

    def _ep_GetSubmissionLimits(self, payload, body, parts):
        fake = self.server_state
        today = datetime.now(timezone.utc).date()
        n_today = sum(s.date.date() == today for s in fake.submissions)
        self._send(200, {"numToday": n_today, "numTotal": len(fake.submissions),
                         "numAllowedNow": max(0, fake.daily_limit - n_today), "limitedByTotal": False})

    def _ep_DownloadDataFiles(self, payload, body, parts):
        fake = self.server_state
        self._send(302, None, "text/html", {"Location": f"http://localhost/files/{fake.slug}.zip?sig=fake"})

    def _ep_files(self, payload, body, parts):
        fake = self.server_state
        self._send(200, fake.data_zip, "application/zip",
                   {"Last-Modified": "Mon, 02 Mar 2026 10:00:00 GMT", "Accept-Ranges": "none"})

    # -- endpoints: datasets -----------------------------------------------------------------------------------------

    def _new_dataset_version(self, ref: str, files: list, title: str, private: bool, notes: str) -> dict:
        """Store a version from the uploaded tokens (leaving out `drop_files`); the answer to send."""
        fake = self.server_state
        if fake.dataset_error:
            return {"status": "error", "error": fake.dataset_error}
        stored = {}
        for item in files:
            token = (item or {}).get("token", "")
            if token not in fake.uploads:
                return {"status": "error", "error": f"file token {token!r} was not uploaded"}
            name = fake._pending_uploads[token]["file_name"]
            if name not in fake.drop_files:
                stored[name] = fake.uploads[token]
        with fake._lock:
            versions = fake.datasets.setdefault(ref, [])
            versions.append({"version": len(versions) + 1, "files": stored, "title": title, "private": private,
                             "notes": notes, "date": datetime.now(timezone.utc).replace(tzinfo=None)})
            fake._dataset_polls[ref] = 0
        return {"ref": ref, "url": f"http://localhost/datasets/{ref}", "status": "ok"}

    def _ep_CreateDataset(self, payload, body, parts):
        fake = self.server_state
        owner, slug = payload.get("ownerSlug", ""), payload.get("slug", "")
        if owner != fake.username:
            return self._error(403, f"Permission denied: cannot create a dataset for '{owner}'")
        ref = f"{owner}/{slug}"
        if ref in fake.datasets:
            return self._send(200, {"status": "error", "error": f"The requested slug \"{slug}\" is already in use"})
        self._send(200, self._new_dataset_version(ref, payload.get("files", []), payload.get("title", ""),
                                                  bool(payload.get("isPrivate", False)), ""))

    def _ep_CreateDatasetVersion(self, payload, body, parts):
        ref, versions = self._dataset(payload)
        if not versions:
            return
        previous = versions[-1]
        inner = payload.get("body") or {}
        self._send(200, self._new_dataset_version(ref, inner.get("files", []), previous["title"], previous["private"],
                                                  inner.get("versionNotes", "")))

    def _ep_GetDatasetStatus(self, payload, body, parts):
        fake = self.server_state
        ref, versions = self._dataset(payload)
        if not versions:
            return
        with fake._lock:
            fake._dataset_polls[ref] = polls = fake._dataset_polls.get(ref, 0) + 1
        status = fake.dataset_status or ("BLOBS_RECEIVED" if polls <= fake.dataset_ready_polls else "READY")
        self._send(200, {"status": status})

    def _dataset(self, payload) -> tuple[str, list]:
        """The dataset an RPC names (ownerSlug, datasetSlug) and its versions; [] after answering 404 when unknown."""
        ref = f"{payload.get('ownerSlug', '')}/{payload.get('datasetSlug', '')}"
        versions = self.server_state.datasets.get(ref) or []
        if not versions:
            self._error(404, f"Dataset {ref} not found")
        return ref, versions

    def _ep_GetDataset(self, payload, body, parts):
        ref, versions = self._dataset(payload)
        if not versions:
            return
        self._send(200, {"ref": ref, "title": versions[-1]["title"], "currentVersionNumber": len(versions),
                         "isPrivate": versions[-1]["private"]})

    def _ep_ListDatasetFiles(self, payload, body, parts):
        ref, versions = self._dataset(payload)
        if not versions:
            return
        number = int(payload.get("datasetVersionNumber") or len(versions))
        if not 1 <= number <= len(versions):
            return self._error(404, f"Dataset {ref} has no version {number}")
        version = versions[number - 1]
        date = version["date"].isoformat(timespec="milliseconds") + "Z"
        self._send(200, {"datasetFiles": [{"ref": f"{ref}/{name}", "name": name, "totalBytes": len(data),
                                           "creationDate": date} for name, data in version["files"].items()]})

    # -- endpoints: kernels ------------------------------------------------------------------------------------------

    def _ep_GetAcceleratorQuotaStatistics(self, payload, body, parts):
        used, allowed = self.server_state.gpu_quota_hours
        if allowed is None:  # as when Kaggle reports none
            return self._error(404, "no quota")
        self._send(200, {"gpuQuota": {"timeUsed": f"{used * 3600:.3f}s", "totalTimeAllowed": f"{allowed * 3600:.3f}s"},
                         "quotaRefreshTime": "2026-12-07T00:00:00Z"})

    def _ep_SaveKernel(self, payload, body, parts):
        fake = self.server_state
        if fake.kernel_error:
            return self._send(200, {"error": fake.kernel_error})
        ref = payload.get("slug") or ""
        if ref.count("/") != 1:
            return self._send(200, {"error": f"Invalid kernel slug {ref!r}: expected owner/slug"})
        if ref.split("/")[0] != fake.username:
            return self._error(403, f"Permission denied: cannot push a kernel for '{ref.split('/')[0]}'")
        datasets, invalid_datasets, versions = [], [], {}
        for source in payload.get("datasetDataSources", []):
            parts_ = source.split("/")
            known = fake.datasets.get("/".join(parts_[:2])) or []
            number = int(parts_[2]) if len(parts_) > 2 and parts_[2].isdigit() else len(known)
            if known and 1 <= number <= len(known):
                datasets.append(source)
                versions["/".join(parts_[:2])] = number
            else:
                invalid_datasets.append(source)
        competitions = [c for c in payload.get("competitionDataSources", []) if c == fake.slug]
        invalid_competitions = [c for c in payload.get("competitionDataSources", []) if c != fake.slug]
        with fake._lock:
            history = fake.kernels.setdefault(ref, [])
            kv = KernelVersion(ref, len(history) + 1, payload.get("text", ""), payload.get("language", ""),
                               payload.get("kernelType", "script"), bool(payload.get("enableInternet", True)),
                               bool(payload.get("enableGpu", False)), datasets, competitions, versions, payload)
            history.append(kv)
            kernel_id = list(fake.kernels).index(ref) + 1
        if payload.get("kernelExecutionType") != "QUICK_SAVE":
            kv.run = fake._start_run(kv, "push")
        answer = {"ref": ref, "url": f"http://localhost/code/{ref}", "versionNumber": kv.number, "kernelId": kernel_id}
        if invalid_datasets:
            answer["invalidDatasetSources"] = invalid_datasets
        if invalid_competitions:
            answer["invalidCompetitionSources"] = invalid_competitions
        self._send(200, answer)

    def _kernel_version(self, payload) -> KernelVersion | None:
        label = str(payload.get("versionLabel") or "")
        number = int(label[1:]) if label[:1] == "v" and label[1:].isdigit() else None
        if label and number is None:
            return None
        return self.server_state.kernel_version(f"{payload.get('userName', '')}/{payload.get('kernelSlug', '')}",
                                                number)

    def _ep_GetKernelSessionStatus(self, payload, body, parts):
        kv = self._kernel_version(payload)
        if kv is None:
            return self._error(404, "Notebook or version not found")
        if kv.run is None:  # saved without running
            return self._send(200, {"status": "COMPLETE"})
        run = kv.run
        answer = {"status": run.status if run.done.is_set() else ("RUNNING" if run.proc is not None else "QUEUED")}
        if answer["status"] == "ERROR":
            answer["failureMessage"] = run.failure
        self._send(200, answer)

    def _ep_ListKernelSessionOutput(self, payload, body, parts):
        fake = self.server_state
        kv = self._kernel_version(payload)
        if kv is None:
            return self._error(404, "Notebook or version not found")
        names = list(kv.run.outputs()) if kv.run is not None else []
        names += [n for n in fake.output_extra if n not in names]
        base = f"http://localhost/kernel-output/{kv.ref}/{kv.number}/"
        log = ((kv.run.stdout + kv.run.stderr)[-LOG_LIMIT:]) if kv.run is not None else ""
        self._send(200, {"files": [{"fileName": n, "url": base + quote(n, safe="")} for n in names], "log": log})

    def _ep_kernel_output(self, payload, body, parts):
        fake = self.server_state
        if len(parts) != 5 or not parts[3].isdigit():
            return self._send(404, b"not found", "text/plain")
        kv = fake.kernel_version(f"{parts[1]}/{parts[2]}", int(parts[3]))
        name = unquote(parts[4])
        if kv is None:
            return self._send(404, b"not found", "text/plain")
        if name in fake.output_extra:
            data = fake.output_extra[name]
        else:
            path = (kv.run.outputs() if kv.run is not None else {}).get(name)
            if path is None:
                return self._send(404, b"not found", "text/plain")
            data = path.read_bytes()
        self._send(200, data, "application/octet-stream")
