"""The Kaggle flow through `ens` itself: automatic upload after `ens run`, the history, `ens submit`,
`ens submissions`, `ens data` — the real kaggle client (in ens's child processes) against the fake server."""

import csv
import os
import signal
import subprocess
import sys
import time
import zipfile
from datetime import datetime, timezone

import pytest

from conftest import copy_project, make_project
from fake_kaggle import FakeKaggle, Submission

pytestmark = pytest.mark.slow  # uses the trained tiny ensemble


def _answers(digits_data):
    with open(digits_data / "solution.csv") as f:
        return {r["image_id"]: r["label"] for r in csv.DictReader(f)}


@pytest.fixture
def kaggle_project(tiny_run, digits_data, tmp_path):
    """A copy of the tiny digits project whose competition carries a Kaggle slug, and a fake Kaggle for it."""
    yield from _with_fake_kaggle(copy_project(tiny_run[0], tmp_path / "p"), digits_data)


@pytest.fixture
def submit_project(digits_data, tmp_path):
    """A digits project with a Kaggle slug and nothing trained (for `ens submit`), and a fake Kaggle for it."""
    yield from _with_fake_kaggle(make_project(tmp_path / "p", digits_data), digits_data)


def _with_fake_kaggle(root, digits_data):
    comp = root / "competitions/digits.yaml"
    comp.write_text(comp.read_text() + "kaggle: digits-demo\n")
    fake = FakeKaggle(slug="digits-demo", answers=_answers(digits_data)).start()
    try:
        yield root, fake
    finally:
        fake.stop()


def _env(fake, cwd, credentials=True, **env_extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KAGGLE_") and k.lower() not in ("no_proxy", "https_proxy", "all_proxy")}
    env.update(fake.env(credentials=credentials), HOME=str(cwd / "home"), HF_HUB_OFFLINE="1", COLUMNS="200",
               ENS_KAGGLE_TIMEOUT="20")
    env.update(env_extra)
    (cwd / "home").mkdir(exist_ok=True)
    return env


def ens_k(fake, *args, cwd, credentials=True, **env_extra):
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd,
                          env=_env(fake, cwd, credentials, **env_extra), capture_output=True, text=True, timeout=300)


def _history(root):
    with open(root / "submissions/digits/history.csv") as f:
        return list(csv.DictReader(f))


def test_run_uploads_waits_for_the_score_and_records_it(kaggle_project):
    root, fake = kaggle_project
    out = ens_k(fake, "run", "digits/tiny.yaml", cwd=root)
    assert out.returncode == 0, out.stderr
    last = _history(root)[-1]
    assert last["destination"] == "kaggle" and last["status"] == "complete" and last["ref"]
    (sub,) = fake.submissions
    csv_path = root / last["file"]
    assert sub.content == csv_path.read_bytes() and sub.file_name == csv_path.name  # exactly the file
    assert str(sub.ref) == last["ref"] and sub.description == last["message"]
    assert f"ens ensembles/digits/tiny.yaml #{last['ensemble_hash'][:8]}: convnext, effnet, resnet; valid accuracy" \
        in sub.description  # the run's hash (and overrides, when given) tell runs apart on Kaggle's list
    # the fake scores against the same answers the local check uses: the two must agree
    local = float([l for l in out.stdout.splitlines() if "test accuracy on the local answers" in l][0].split()[-1])
    assert float(last["score"]) == pytest.approx(sub.score, abs=1e-5) and sub.score == pytest.approx(local, abs=1e-4)
    assert f"submitted as ref {last['ref']}: public score" in out.stdout
    assert fake.endpoints().count("ListSubmissions") >= 2  # PENDING first, then COMPLETE
    # the same run again: no copy of the CSV, no history row, not uploaded, said so, exit 0; --force uploads it
    again = ens_k(fake, "run", "digits/tiny.yaml", "--no-wait", cwd=root)
    assert again.returncode == 0 and len(fake.uploads) == 1, again.stderr
    assert f"unchanged: {last['file']}" in again.stdout and f"already submitted as ref {last['ref']}" in again.stdout
    assert len(_history(root)) == 1 and len(list((root / "submissions/digits").glob("*-tiny*.csv"))) == 1
    forced = ens_k(fake, "run", "digits/tiny.yaml", "--no-wait", "--force", cwd=root)
    assert forced.returncode == 0 and len(fake.uploads) == 2 and _history(root)[-1]["status"] == "pending"
    # ens submissions refreshes the pending one from Kaggle
    for _ in range(3):  # Kaggle answers PENDING for a while
        listing = ens_k(fake, "submissions", "digits", cwd=root)
        assert listing.returncode == 0, listing.stderr
        if _history(root)[-1]["status"] == "complete":
            break
    assert _history(root)[-1]["status"] == "complete" and _history(root)[-1]["score"]
    assert _history(root)[-1]["ref"] in listing.stdout


def test_no_submit_keeps_it_local(kaggle_project):
    root, fake = kaggle_project
    out = ens_k(fake, "run", "digits/tiny.yaml", "--no-submit", cwd=root)
    assert out.returncode == 0 and not fake.uploads
    assert _history(root)[-1]["destination"] == "not submitted: --no-submit" and "ens submit submissions/" in out.stdout


def test_a_run_with_overrides_submits_only_with_submit(kaggle_project):
    # a smoke test or an experiment spends no daily submission unasked; what the YAML describes is uploaded
    root, fake = kaggle_project
    out = ens_k(fake, "run", "digits/tiny.yaml", "members.convnext.weight=2", cwd=root)
    assert out.returncode == 0 and not fake.uploads, out.stderr
    assert ("kaggle: not submitted: a run with overrides (members.convnext.weight=2) submits only with --submit; "
            "later: ens submit submissions/") in out.stdout, out.stdout
    assert _history(root)[-1]["destination"] == "not submitted: overrides"
    out = ens_k(fake, "run", "digits/tiny.yaml", "members.convnext.weight=2", "--submit", "--no-wait", cwd=root)
    assert out.returncode == 0 and len(fake.uploads) == 1, out.stderr
    assert _history(root)[-1]["destination"] == "kaggle"


FAILURES = {
    "no credentials": (dict(credentials=False), "credentials"),
    "401": (dict(fail={"*": 401}), "401"),
    "403": (dict(fail={"*": 403}), "rules"),
    "404": (dict(fail={"*": 404}), "slug"),
    "429": (dict(fail={"*": 429}), "429"),
    "500": (dict(fail={"*": 500}), "500"),
    "upload PUT": (dict(fail={"upload": 500}), "upload"),
    "no quota": (dict(daily_limit=1), "no submissions to 'digits-demo' left today"),
    "unreachable": (dict(unreachable=True), "reach"),
    "no answer": (dict(hang={"*"}), "no answer from Kaggle within 3 s"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_every_failure_keeps_the_csv_records_why_and_says_how_to_retry(kaggle_project, case):
    root, fake = kaggle_project
    setup, expected = FAILURES[case]
    csv_path = next(root.glob("submissions/digits/*-tiny.csv"), None) or _write_csv(root)
    credentials, env = setup.get("credentials", True), {}
    fake.fail.update(setup.get("fail", {}))
    fake.hang = set(setup.get("hang", ()))
    if "daily_limit" in setup:  # one submission already made today uses the whole quota
        fake.daily_limit = setup["daily_limit"]
        fake.submissions.append(Submission(1, datetime.now(timezone.utc).replace(tzinfo=None), "earlier", "x.csv",
                                           b"", 0.5, None))
    if setup.get("unreachable"):
        env["HTTP_PROXY"] = env["http_proxy"] = "http://127.0.0.1:9"  # discard port: refused
    out = ens_k(fake, "submit", str(csv_path.relative_to(root)), "-c", "digits", "-m", "by hand", cwd=root,
                credentials=credentials, ENS_KAGGLE_TIMEOUT="3", **env)
    assert out.returncode == 1, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert expected.lower() in lines[0].lower(), lines[0]
    assert f"retry: ens submit submissions/digits/{csv_path.name} --competition digits -m 'by hand'" in lines[0]
    assert fake.key not in out.stderr + out.stdout
    assert csv_path.is_file() and _history(root)[-1]["destination"].startswith("not submitted: ")


def _write_csv(root):
    out = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "digits/tiny.yaml", "--no-submit"], cwd=root,
                         capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    return next(root.glob("submissions/digits/*-tiny.csv"))


def test_run_whose_upload_fails_still_shows_its_results_and_exits_1(kaggle_project):
    root, fake = kaggle_project
    fake.fail["*"] = 500
    out = ens_k(fake, "run", "digits/tiny.yaml", cwd=root)
    assert out.returncode == 1 and "ensemble valid accuracy" in out.stdout
    assert "retry: ens submit submissions/digits/" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    row = _history(root)[-1]
    assert row["destination"].startswith("not submitted: ") and (root / row["file"]).is_file()


def test_ens_data_downloads_and_unzips_the_competition(kaggle_project, digits_data, tmp_path):
    root, fake = kaggle_project
    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(digits_data.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(digits_data).as_posix())
    fake.data_zip = archive.read_bytes()
    comp = root / "competitions/digits.yaml"
    text = comp.read_text().replace("builtin: digits", "").rsplit("data_dir:", 1)[0]
    comp.write_text(text + "data_dir: cache/data/fromkaggle\nkaggle: digits-demo\n")
    out = ens_k(fake, "data", "digits", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "1438 training images" in out.stdout and (root / "cache/data/fromkaggle/solution.csv").is_file()
    assert not [p for p in (root / "cache/data").iterdir() if "partial" in p.name]


def _answers_csv(root, digits_data, name="answers.csv"):
    """A valid submission without running anything: the local answers themselves."""
    dest = root / "submissions/digits" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes((digits_data / "solution.csv").read_bytes())
    return dest


def _popen_ens(fake, *args, cwd):
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=_env(fake, cwd), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _polling_after_upload(fake) -> bool:
    """Uploaded, and already waiting for the score (listing the submissions)."""
    calls = fake.endpoints()
    return "CreateSubmission" in calls and "ListSubmissions" in calls[calls.index("CreateSubmission"):]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_stopped_during_the_score_wait_the_upload_is_recorded_as_pending(submit_project, digits_data, sig):
    """Ctrl-C (or a kill) while waiting for the public score: the history already holds the upload, with its ref,
    so nothing is sent twice; `ens submissions` fetches the score later. (`ens run` delivers through the same
    code, `deliver_to_kaggle`.)"""
    root, fake = submit_project
    fake.pending_polls = 10 ** 6  # Kaggle keeps it pending
    csv_path = _answers_csv(root, digits_data)
    proc = _popen_ens(fake, "submit", str(csv_path.relative_to(root)), "-c", "digits", "-m", "by hand", cwd=root)
    deadline = time.monotonic() + 120
    while not _polling_after_upload(fake):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, error = proc.communicate(timeout=60)
    (sub,) = fake.submissions
    rows = _history(root)
    assert len(rows) == 1 and rows[0]["ref"] == str(sub.ref) and rows[0]["status"] == "pending", (rows, error)
    assert rows[0]["destination"] == "kaggle" and rows[0]["file"].endswith(sub.file_name)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
        assert f"ref {sub.ref}" in error and "ens submissions digits" in error
    # the same bytes are not sent again; `ens submissions` fills in the score once Kaggle has it
    again = ens_k(fake, "submit", rows[0]["file"], "-c", "digits", "-m", "again", cwd=root)
    assert again.returncode == 1 and "identical to" in again.stderr and len(fake.uploads) == 1
    fake.pending_polls = 0
    listing = ens_k(fake, "submissions", "digits", cwd=root)
    assert listing.returncode == 0, listing.stderr
    (row,) = [r for r in _history(root) if r["ref"] == str(sub.ref)]
    assert row["status"] == "complete" and float(row["score"]) == pytest.approx(sub.score, abs=1e-5)


def test_an_upload_without_answer_is_unknown_not_lost(submit_project, digits_data):
    """The upload's last step gets no answer: Kaggle may have the submission. The history says 'unknown', the
    same bytes need --force, and `ens submissions` resolves the row once Kaggle lists the file."""
    root, fake = submit_project
    csv_path = _answers_csv(root, digits_data)
    shown = str(csv_path.relative_to(root))
    fake.hang = {"CreateSubmission"}
    out = ens_k(fake, "submit", shown, "-c", "digits", "-m", "by hand", cwd=root, ENS_KAGGLE_TIMEOUT="3")
    assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert "unknown" in out.stderr and "ens submissions digits" in out.stderr, out.stderr
    (row,) = _history(root)
    assert row["destination"] == "kaggle" and row["status"] == "unknown" and not row["ref"]
    # sending the same bytes again could spend the quota twice: refused until checked
    fake.hang, before = set(), len(fake.requests)
    again = ens_k(fake, "submit", shown, "-c", "digits", "-m", "by hand", cwd=root)
    assert again.returncode == 1 and "ens submissions digits" in again.stderr and "--force" in again.stderr
    assert fake.requests[before:] == [] and fake.submissions == []
    # not on Kaggle's list (yet): `ens submissions` says so, and how to send it again
    listing = ens_k(fake, "submissions", "digits", cwd=root)
    assert listing.returncode == 0 and _history(root)[0]["status"] == "unknown"
    assert f"ens submit {shown} --competition digits -m 'by hand' --force" in listing.stderr, listing.stderr
    # Kaggle did get it after all: its list shows the file with that description
    fake.submissions.append(Submission(40_000_077, datetime.now(timezone.utc).replace(tzinfo=None), "by hand",
                                       csv_path.name, csv_path.read_bytes(), 0.75, None))
    fake.pending_polls = 0
    listing = ens_k(fake, "submissions", "digits", cwd=root)
    assert listing.returncode == 0, listing.stderr
    row = _history(root)[0]
    assert row["ref"] == "40000077" and row["status"] == "complete" and row["score"] == "0.750000"
    assert len(_history(root)) == 2  # the first upload, and the refusal
