"""pipelines/kaggle.py against a fake Kaggle server, through the REAL kaggle client.

`pipelines.kaggle` runs every client call in a child Python process, which inherits the environment these tests
set (KAGGLE_API_ENVIRONMENT=LOCALHOST, HTTP_PROXY=the fake server, fake credentials, HOME=a temp folder) before
it imports `kaggle`; the fake server (tests/fake_kaggle.py) records what it received and checks credentials,
slug and uploaded bytes."""

import io
import os
import socket
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fake_kaggle import FakeKaggle
from pipelines import kaggle as K

os.environ["HF_HUB_OFFLINE"] = "1"

SLUG = "digits"
ANSWERS = {"a.png": "3", "b.png": "7", "c.png": "1", "d.png": "0"}
DATA = {"train.csv": "id,label\nt1.png,3\nt2.png,7\n", "train_images/3/t1.png": "PNG-1",
        "test_images/a.png": "PNG-a", "sample_submission.csv": "image_id,label\na.png,0\n"}


def make_zip(files: dict, raw: list | None = None) -> bytes:
    """A zip with `files` (name -> text) and `raw` ZipInfo entries [(ZipInfo, bytes)] written as they are."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in files.items():
            z.writestr(name, text)
        for info, data in raw or []:
            z.writestr(info, data)
    return buf.getvalue()


def entry(name: str, mode: int = 0o100644) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo("placeholder")
    info.filename = name  # set afterwards: nothing normalises it
    info.external_attr = mode << 16
    return info


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    """The fake server, started, with the environment pointing the client at it (right credentials)."""
    fake = FakeKaggle(slug=SLUG, answers=ANSWERS, data_zip=make_zip(DATA)).start()
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name.lower() in ("no_proxy", "https_proxy", "all_proxy", "xdg_config_home",
                                                           "verbose", "verbose_output"):
            monkeypatch.delenv(name, raising=False)
    for name, value in fake.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield fake
    finally:
        fake.stop()


def csv_file(tmp_path, rows=(("a.png", "3"), ("b.png", "7"), ("c.png", "2"), ("d.png", "0"))) -> Path:
    path = tmp_path / "sub.csv"
    path.write_text("image_id,label\n" + "".join(f"{i},{l}\n" for i, l in rows))
    return path


def assert_clean(message: str, fake: FakeKaggle | None = None):
    """One line, no traceback, no secret."""
    assert "\n" not in message and "Traceback" not in message
    if fake is not None:
        assert fake.key not in message
        if fake.token:
            assert fake.token not in message


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# download and safe extraction


def test_download_extracts_into_place(fake_kaggle, tmp_path):
    dest = tmp_path / "data" / SLUG
    assert K.download(SLUG, dest) == dest
    for name, text in DATA.items():
        assert (dest / name).read_text() == text
    assert siblings(dest.parent) == [SLUG]  # no zip, no partial folder left beside it
    assert fake_kaggle.endpoints() == ["DownloadDataFiles", "files"]
    call = fake_kaggle.requests[0]
    assert call.json == {"competitionName": SLUG} and call.headers["Authorization"].startswith("Basic ")

    K.download(SLUG, dest)  # complete already: no request
    assert len(fake_kaggle.requests) == 2
    fake_kaggle.data_zip = make_zip({"new.txt": "v2"})
    K.download(SLUG, dest, force=True)
    assert siblings(dest) == ["new.txt"] and siblings(dest.parent) == [SLUG]


def test_download_sweeps_leftovers_of_dead_runs(fake_kaggle, tmp_path):
    dest = tmp_path / SLUG
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".{SLUG}.partial-unzip-{int(dead.stdout)}-0123abcd"
    (leftover / "train_images").mkdir(parents=True)
    K.download(SLUG, dest)
    assert siblings(tmp_path) == [SLUG, "home"]


MALICIOUS = {
    "dotdot": lambda tmp: [(entry("../evil.txt"), b"pwned")],
    "absolute": lambda tmp: [(entry(str(tmp / "abs_evil.txt")), b"pwned")],
    "symlink": lambda tmp: [(entry("link", stat.S_IFLNK | 0o777), str(tmp / "outside").encode()),
                            (entry("link/evil.txt"), b"pwned")],
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS))
def test_zip_slip_is_rejected_whole(fake_kaggle, tmp_path, kind):
    (tmp_path / "outside").mkdir()
    fake_kaggle.data_zip = make_zip({"aaa_first.txt": "fine"}, MALICIOUS[kind](tmp_path))
    dest = tmp_path / "data" / SLUG
    with pytest.raises(K.KaggleError) as e:
        K.download(SLUG, dest)
    assert_clean(str(e.value), fake_kaggle)
    assert "rejected" in str(e.value) and "unsafe archive entry" in e.value.reason
    assert str(e.value).startswith("Kaggle's data archive of 'digits': entry ") and ".partial-" not in str(e.value)
    assert not dest.exists() and siblings(dest.parent) == []  # nothing half-extracted, no partial folder
    assert not (tmp_path / "data" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert not (tmp_path / "abs_evil.txt").exists() and siblings(tmp_path / "outside") == []


def test_download_of_something_else_than_a_zip(fake_kaggle, tmp_path):
    fake_kaggle.data_zip = b"<html>not a zip</html>"
    with pytest.raises(K.KaggleError, match="^Kaggle's data archive of 'digits' is not a readable zip archive"):
        K.download(SLUG, tmp_path / "data" / SLUG)
    assert siblings(tmp_path / "data") == []


def test_safe_extract_leaves_an_existing_folder_alone_when_refusing(tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(make_zip({"ok.txt": "x"}, [(entry("sub/../../evil.txt"), b"pwned")]))
    with pytest.raises(K.KaggleError, match="'..' component"):
        K.safe_extract(bad, dest)
    assert siblings(dest) == ["old.txt"] and not (tmp_path / "evil.txt").exists()
    assert siblings(tmp_path) == ["bad.zip", "data"]


def test_safe_extract_failing_midway_leaves_nothing(tmp_path):
    """A member that fails its CRC after others were written: no half-extracted folder."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("a_first.txt", "first member")
        z.writestr("b_second.txt", "SECOND-MEMBER-PAYLOAD")
    data = buf.getvalue().replace(b"SECOND-MEMBER-PAYLOAD", b"SECOND-MEMBER-PAYLOAX")
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(data)
    with pytest.raises(K.KaggleError, match="extraction failed") as e:
        K.safe_extract(corrupt, tmp_path / "data")
    assert_clean(str(e.value))
    assert siblings(tmp_path) == ["corrupt.zip"]


def test_download_that_hangs_is_stopped_and_leaves_nothing(fake_kaggle, tmp_path):
    fake_kaggle.hang = {"files"}
    dest = tmp_path / "data" / SLUG
    start = time.monotonic()
    with pytest.raises(K.KaggleError, match="no answer from Kaggle within 1.5 s") as e:
        K.download(SLUG, dest, timeout=1.5)
    assert time.monotonic() - start < 20  # stopped: the fake would hang for 60 s (wide: a loaded machine is slow)
    assert e.value.transient and not dest.exists() and siblings(dest.parent) == []


# ---------------------------------------------------------------------------------------------------------------
# submissions


def test_submit_wait_list_and_quota(fake_kaggle, tmp_path):
    csv = csv_file(tmp_path)
    assert K.remaining_submissions(SLUG) == 5
    ref = K.submit(SLUG, csv, "ens digits/final: 4 members")
    assert ref == "40000001"
    assert fake_kaggle.endpoints()[-3:] == ["StartSubmissionUpload", "upload", "CreateSubmission"]
    start, put, create = fake_kaggle.requests[-3:]
    assert start.json["competitionName"] == SLUG and start.json["fileName"] == "sub.csv"
    assert start.json["contentLength"] == csv.stat().st_size
    assert put.method == "PUT" and put.body == csv.read_bytes()
    assert create.json["submissionDescription"] == "ens digits/final: 4 members"
    assert create.json["blobFileTokens"] == next(iter(fake_kaggle.uploads))

    listed = K.list_submissions(SLUG)  # the first poll: still pending
    assert listed == [{"ref": ref, "date": listed[0]["date"], "description": "ens digits/final: 4 members",
                       "file_name": "sub.csv", "status": "pending", "public_score": None, "error_description": ""}]
    scored = K.wait_for_score(SLUG, ref, total_timeout=20, first_delay=0.1)
    assert scored["status"] == "complete" and scored["public_score"] == pytest.approx(0.75)
    assert K.remaining_submissions(SLUG) == 4


def test_wait_for_score_polls_through_pending_with_backoff(fake_kaggle, tmp_path):
    fake_kaggle.pending_polls = 2
    ref = K.submit(SLUG, csv_file(tmp_path), "m")
    start = time.monotonic()
    scored = K.wait_for_score(SLUG, ref, total_timeout=20, first_delay=0.2, max_delay=0.4)
    assert scored["public_score"] == pytest.approx(0.75)
    assert fake_kaggle.endpoints().count("ListSubmissions") == 3
    assert time.monotonic() - start >= 0.2 + 0.4 + 0.4  # 0.2, then doubled, capped at 0.4


def test_wait_for_score_reports_a_failed_scoring_and_a_timeout(fake_kaggle, tmp_path):
    ref = K.submit(SLUG, csv_file(tmp_path, rows=[("a.png", "3")]), "missing rows")
    failed = K.wait_for_score(SLUG, ref, total_timeout=20, first_delay=0.1)
    assert failed["status"] == "error" and "b.png" in failed["error_description"]

    fake_kaggle.pending_polls = 1000
    ref = K.submit(SLUG, csv_file(tmp_path), "slow")
    start = time.monotonic()
    with pytest.raises(K.KaggleError, match="not scored within 1.5 s .still pending.") as e:
        K.wait_for_score(SLUG, ref, total_timeout=1.5, first_delay=0.1)
    assert time.monotonic() - start < 20 and e.value.transient  # bounded (wide: a loaded machine is slow)


def test_remaining_submissions_unknown_is_none(fake_kaggle):
    fake_kaggle.daily_limit = 0  # GetSubmissionLimits answers all zeros (not on a team yet)
    assert K.remaining_submissions(SLUG) is None


def test_credentials_from_kaggle_json_in_config_dir(fake_kaggle, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    config = tmp_path / "kcfg"
    config.mkdir()
    (config / "kaggle.json").write_text(f'{{"username": "{fake_kaggle.username}", "key": "{fake_kaggle.key}"}}')
    (config / "kaggle.json").chmod(0o600)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(config))
    assert K.list_submissions(SLUG) == []


def test_access_token_is_sent_as_bearer(fake_kaggle, tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    fake_kaggle.token = "KGAT_fake_token_0123456789"
    monkeypatch.setenv("KAGGLE_API_TOKEN", fake_kaggle.token)
    ref = K.submit(SLUG, csv_file(tmp_path), "by token")
    assert fake_kaggle.submissions[-1].ref == int(ref)
    assert fake_kaggle.requests[-1].headers["Authorization"] == f"Bearer {fake_kaggle.token}"

    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_wrong_token_999")
    with pytest.raises(K.KaggleError, match="did not accept the API token from KAGGLE_API_TOKEN") as e:
        K.list_submissions(SLUG)
    assert_clean(str(e.value), fake_kaggle) and "KGAT_wrong_token_999" not in str(e.value)


def test_pipelines_kaggle_does_not_import_kaggle():
    code = "import sys, pipelines.kaggle; print('kaggle' in sys.modules, 'kagglesdk' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------------------------
# failures: each one line, naming the problem and the fix, with no secret


def test_no_credentials(fake_kaggle, monkeypatch, tmp_path):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    with pytest.raises(K.KaggleError) as e:
        K.submit(SLUG, csv_file(tmp_path), "m")
    message = str(e.value)
    assert_clean(message)
    assert message.startswith("no Kaggle credentials found")
    for hint in ("~/.kaggle/kaggle.json", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        assert hint in message
    assert fake_kaggle.requests == [] and e.value.reason == "no credentials"


def test_wrong_key_is_401(fake_kaggle, monkeypatch):
    monkeypatch.setenv("KAGGLE_KEY", "wrong-key-456")
    with pytest.raises(K.KaggleError, match=r"rejected the credentials .*401") as e:
        K.list_submissions(SLUG)
    assert_clean(str(e.value), fake_kaggle) and "wrong-key-456" not in str(e.value)
    assert "KAGGLE_USERNAME/KAGGLE_KEY" in str(e.value) and not e.value.transient


def test_unknown_competition_is_404(fake_kaggle):
    with pytest.raises(K.KaggleError, match="no competition 'digitz' .404") as e:
        K.download("digitz", Path(os.environ["HOME"]) / "d")
    assert "check the slug" in str(e.value) and e.value.reason.startswith("404")


@pytest.mark.parametrize("op,endpoint,status,expected", [
    ("submit", "StartSubmissionUpload", 401, "401 unauthorized"),
    ("submit", "CreateSubmission", 403, "https://www.kaggle.com/competitions/digits/rules"),
    ("download", "DownloadDataFiles", 403, "accept the competition's rules"),
    ("list", "ListSubmissions", 404, "check the slug"),
    ("submit", "CreateSubmission", 429, "429 too many requests"),
    ("limits", "GetSubmissionLimits", 429, "try again later"),
    ("download", "files", 500, "500 server error"),
    ("list", "ListSubmissions", 500, "retry later"),
])
def test_http_failures(fake_kaggle, tmp_path, op, endpoint, status, expected):
    fake_kaggle.fail[endpoint] = status
    calls = {"submit": lambda: K.submit(SLUG, csv_file(tmp_path), "m"),
             "download": lambda: K.download(SLUG, tmp_path / "data"),
             "list": lambda: K.list_submissions(SLUG),
             "limits": lambda: K.remaining_submissions(SLUG)}
    with pytest.raises(K.KaggleError) as e:
        calls[op]()
    assert expected in str(e.value)
    assert_clean(str(e.value), fake_kaggle)
    assert e.value.reason.startswith(str(status))
    assert e.value.transient == (status in (429, 500))
    assert not (tmp_path / "data").exists()
    if op == "submit":  # Kaggle answered no: certainly not submitted
        assert not e.value.maybe_submitted
    if status == 403:
        assert e.value.reason == "403 forbidden: accept the rules at https://www.kaggle.com/competitions/digits/rules"


def test_upload_put_failure_is_raised(fake_kaggle, tmp_path):
    fake_kaggle.fail["upload"] = 500
    with pytest.raises(K.KaggleError, match="upload failed .* nothing was submitted") as e:
        K.submit(SLUG, csv_file(tmp_path), "m")
    assert_clean(str(e.value), fake_kaggle)
    assert "CreateSubmission" not in fake_kaggle.endpoints() and fake_kaggle.submissions == []
    assert not e.value.maybe_submitted  # Kaggle's storage said no: certainly not submitted


def test_unreachable(fake_kaggle, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(K.KaggleError, match="cannot reach Kaggle .*connection refused") as e:
        K.list_submissions(SLUG)
    assert time.monotonic() - start < 30 and e.value.transient  # failed, not waited for the 60 s call limit
    assert_clean(str(e.value), fake_kaggle)


@pytest.mark.parametrize("hang", ["ListSubmissions", "upload"])
def test_silent_server_is_bounded(fake_kaggle, tmp_path, hang):
    fake_kaggle.hang = {hang}
    start = time.monotonic()
    with pytest.raises(K.KaggleError, match="no answer from Kaggle within 2 s") as e:
        if hang == "upload":
            K.submit(SLUG, csv_file(tmp_path), "m", timeout=2)
        else:
            K.list_submissions(SLUG, timeout=2)
    assert 2 <= time.monotonic() - start < 20  # the fake would hang for 60 s (wide: a loaded machine is slow)
    assert_clean(str(e.value), fake_kaggle) and e.value.reason == "timeout: no answer within 2 s"
    assert hang in fake_kaggle.endpoints() and fake_kaggle.submissions == []
    if hang == "upload":  # cut off mid-submission: only Kaggle's list can tell whether it has it
        assert e.value.maybe_submitted


def test_bad_slug_fails_before_any_call(fake_kaggle):
    with pytest.raises(K.KaggleError, match="not a Kaggle competition slug"):
        K.list_submissions("../etc")
    assert fake_kaggle.requests == []
