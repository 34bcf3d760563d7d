"""A fake Kaggle API server for the tests: the real `kaggle` client talks to it as it would to api.kaggle.com.

The client is pointed at it with `KAGGLE_API_ENVIRONMENT=LOCALHOST` (requests go to http://localhost/api/v1/...)
and `HTTP_PROXY=http://127.0.0.1:PORT` (so they all arrive here, as absolute-URI proxy requests); `env()` gives
the variables. It checks what Kaggle would check: the credentials (HTTP basic username:key, or a bearer token),
the competition's name, the uploaded bytes against the announced length; it scores a submitted CSV (accuracy on
`answers`), answers PENDING to the first `pending_polls` listings of a new submission and then COMPLETE, serves
DownloadDataFiles as a redirect to a zip, and can be told to fail (`fail`), or to hang (`hang`).

Endpoints (POST, JSON, under /api/v1/competitions.CompetitionApiService/): StartSubmissionUpload -> {token,
createUrl}; CreateSubmission -> {message, ref}; ListSubmissions -> {submissions: [...]}; GetSubmissionLimits ->
{numToday, numTotal, numAllowedNow, limitedByTotal}; DownloadDataFiles -> 302 to /files/<slug>.zip. Also
security.OAuthService/IntrospectToken (the client checks an access token with it). PUT /upload/<token> takes the
file; GET /files/<slug>.zip gives the zip.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ENDPOINTS = ("StartSubmissionUpload", "upload", "CreateSubmission", "ListSubmissions", "GetSubmissionLimits",
             "DownloadDataFiles", "files", "IntrospectToken")


@dataclass
class Recorded:
    method: str
    endpoint: str          # one of ENDPOINTS (or the last path segment)
    path: str
    headers: dict
    body: bytes
    json: dict | None = None


@dataclass
class Submission:
    ref: int
    date: datetime
    description: str
    file_name: str
    content: bytes
    score: float | None
    error: str | None
    polls: int = 0


class FakeKaggle:
    """State and knobs of the fake server. Start with `start()` (or the `fake_kaggle` fixture), stop with `stop()`.

    Knobs: `fail[endpoint] = status` makes that endpoint (or "*" for all) answer `status` (401, 403, 404, 429,
    500, ...; for "upload" the PUT of the file); `hang` is a set of endpoints (or {"*"}) that accept the request
    and never answer; `data_zip` the bytes served as the competition's data; `answers` id -> label; `pending_polls`
    how many ListSubmissions answer PENDING for a new submission; `daily_limit` for GetSubmissionLimits.
    `requests` records every request received, `submissions` every submission made, `uploads` the uploaded bytes."""

    def __init__(self, slug: str = "digits", username: str = "alice", key: str = "s3cret-key-123",
                 token: str | None = None, answers: dict[str, str] | None = None, data_zip: bytes = b"",
                 pending_polls: int = 1, daily_limit: int = 5):
        self.slug, self.username, self.key, self.token = slug, username, key, token
        self.answers = dict(answers or {})
        self.data_zip = data_zip
        self.pending_polls = pending_polls
        self.daily_limit = daily_limit
        self.fail: dict[str, int] = {}
        self.hang: set[str] = set()
        self.requests: list[Recorded] = []
        self.submissions: list[Submission] = []
        self.uploads: dict[str, bytes] = {}
        self._pending_uploads: dict[str, dict] = {}
        self._refs = itertools.count(40_000_001)
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        self._release = threading.Event()
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
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

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

    def score(self, content: bytes) -> tuple[float | None, str | None]:
        try:
            rows = list(csv.reader(io.StringIO(content.decode("utf-8"))))
        except UnicodeDecodeError:
            return None, "the file is not UTF-8 text"
        if len(rows) < 2 or len(rows[0]) < 2:
            return None, "the file needs a header and an id and a label column"
        predicted = {row[0]: row[-1] for row in rows[1:] if row}
        if not self.answers:
            return None, None
        missing = [i for i in self.answers if i not in predicted]
        if missing:
            return None, f"ERROR: Could not find id '{missing[0]}' in the submission"
        return sum(predicted[i] == label for i, label in self.answers.items()) / len(self.answers), None


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
        if len(parts) >= 2 and parts[0] == "upload":
            endpoint = "upload"
        elif len(parts) >= 2 and parts[0] == "files":
            endpoint = "files"
        body = self._body()
        try:
            payload = json.loads(body) if body and method == "POST" else None
        except ValueError:
            payload = None
        with fake._lock:
            fake.requests.append(Recorded(method, endpoint, path, dict(self.headers), body, payload))
        if endpoint in fake.hang or "*" in fake.hang:
            fake._release.wait(timeout=60)  # accept, read, and never answer
            self.close_connection = True
            return
        status = fake.fail.get(endpoint) or (fake.fail.get("*") if endpoint != "IntrospectToken" else None)
        if status:
            return self._error(status, f"fake failure {status} on {endpoint}")
        handler = getattr(self, f"_ep_{endpoint}", None)
        if handler is None:
            return self._error(404, f"no such endpoint {path}")
        if endpoint not in ("upload", "files", "IntrospectToken") and not fake.authorized(
                self.headers.get("Authorization")):
            return self._error(401, "Unauthenticated")
        if endpoint not in ("upload", "files", "IntrospectToken"):
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

    # -- endpoints -----------------------------------------------------------------------------------------------

    def _ep_IntrospectToken(self, payload, body, parts):
        fake = self.server_state
        if fake.token is not None and payload.get("token") == fake.token:
            return self._send(200, {"active": True, "username": fake.username, "clientId": "kaggle-cli"})
        return self._send(200, {"active": False})

    def _ep_StartSubmissionUpload(self, payload, body, parts):
        fake = self.server_state
        with fake._lock:
            token = f"blob-{next(fake._tokens)}"
            fake._pending_uploads[token] = {"file_name": payload.get("fileName", ""),
                                            "length": int(payload.get("contentLength", 0))}
        self._send(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})

    def _ep_upload(self, payload, body, parts):
        fake = self.server_state
        token = parts[1]
        pending = fake._pending_uploads.get(token)
        if pending is None:
            return self._send(404, b"unknown upload", "text/plain")
        if len(body) != pending["length"]:
            return self._send(400, b"length differs from the announced contentLength", "text/plain")
        fake.uploads[token] = body
        self._send(200, b"", "text/plain")

    def _ep_CreateSubmission(self, payload, body, parts):
        fake = self.server_state
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
        self._send(200, {"message": "Successfully submitted to Fake Digits", "ref": sub.ref})

    def _ep_ListSubmissions(self, payload, body, parts):
        fake = self.server_state
        items = []
        with fake._lock:
            for sub in sorted(fake.submissions, key=lambda s: s.ref, reverse=True):
                sub.polls += 1
                item = {"ref": sub.ref, "totalBytes": len(sub.content),
                        "date": sub.date.isoformat(timespec="milliseconds") + "Z",
                        "description": sub.description, "fileName": sub.file_name, "submittedBy": fake.username,
                        "teamName": fake.username, "status": "PENDING"}
                if sub.polls > fake.pending_polls:
                    if sub.error:
                        item.update(status="ERROR", errorDescription=sub.error)
                    else:
                        item.update(status="COMPLETE", publicScore=f"{sub.score:.5f}" if sub.score is not None
                                    else "")
                items.append(item)
        self._send(200, {"submissions": items})

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
