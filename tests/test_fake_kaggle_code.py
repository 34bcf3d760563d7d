"""The fake Kaggle's code-competition side (tests/fake_kaggle.py), driven by the REAL kaggle client: GetCompetition,
datasets (create, status, files, versions), kernels (push, run, status, output) and code submissions scored by a
rerun on hidden data. Each client call runs in a child process with its own HOME, TMPDIR and KAGGLE_CONFIG_DIR, the
environment set before `kaggle` is imported (as pipelines/kaggle.py does)."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image

from fake_kaggle import FakeKaggle

SLUG = "digits"
SCALE = 20  # the "model": a test image's label is its pixel value // SCALE
MODEL = json.dumps({"scale": SCALE}).encode()
PUBLIC = {"p1.png": "3", "p2.png": "7", "p3.png": "1"}
HIDDEN = {"h1.png": "3", "h2.png": "7", "h3.png": "1", "h4.png": "0", "h5.png": "9"}

PRELUDE = """\
import json, sys, time
from kaggle import api

def out(value):
    print(json.dumps(value, default=str))

def wait_kernel(ref, deadline=30):
    end = time.monotonic() + deadline
    while True:
        st = api.kernels_status(ref)
        if st.status.name in ("COMPLETE", "ERROR") or time.monotonic() > end:
            return st.status.name, st.failure_message
        time.sleep(0.1)
"""


def client(fake: FakeKaggle, tmp_path: Path, code: str, timeout: float = 90) -> dict:
    """Run `code` (after PRELUDE: `api` authenticated, `out()`) in a child Python against `fake`; the JSON of its
    last stdout line."""
    work = tmp_path / "client"
    for sub in ("home", "tmp", "config"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith("KAGGLE_") and not k.upper().endswith("_PROXY") and k.lower() != "no_proxy"}
    env.update(fake.env(), HOME=str(work / "home"), TMPDIR=str(work / "tmp"), KAGGLE_CONFIG_DIR=str(work / "config"),
               PYTHONIOENCODING="utf-8")
    script = work / "child.py"
    script.write_text(PRELUDE + textwrap.dedent(code))
    proc = subprocess.run([sys.executable, str(script)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _images(folder: Path, labels: dict[str, str]) -> None:
    (folder / "test").mkdir(parents=True)
    for name, label in labels.items():
        Image.new("L", (4, 4), int(label) * SCALE).save(folder / "test" / name)
    (folder / "sample_submission.csv").write_text("image_id,label\n" + "".join(f"{n},0\n" for n in labels))


@pytest.fixture
def fake(tmp_path):
    public, hidden = tmp_path / "public", tmp_path / "hidden"
    _images(public, PUBLIC)
    _images(hidden, HIDDEN)
    fake = FakeKaggle(slug=SLUG, answers=PUBLIC, public_data=public, hidden_data=hidden, hidden_answers=HIDDEN,
                      pending_polls=0, runs_dir=tmp_path / "runs").start()
    fake.run_timeout = fake.rerun_timeout = 30
    try:
        yield fake
    finally:
        fake.stop()


# the notebook: reads the "model" from its dataset, predicts the competition's test images, writes submission.csv;
# MODE makes it misbehave in the ways Kaggle's reruns catch
NOTEBOOK = """\
import csv, json, os, socket, sys, time
from pathlib import Path
from PIL import Image

MODE = {mode!r}
root = Path(os.environ.get("ENS_KAGGLE_ROOT", "/kaggle"))
inp = root / "input"
print("root", root, "run type", os.environ.get("KAGGLE_KERNEL_RUN_TYPE"), "rerun",
      os.environ.get("KAGGLE_IS_COMPETITION_RERUN"), "proxy", os.environ.get("HTTP_PROXY"))
seen = sorted(os.path.relpath(os.path.join(d, f), inp) for d, _, fs in os.walk(inp, followlinks=True) for f in fs)
try:
    socket.create_connection(("127.0.0.1", {port}), timeout=3).close()
    net = "connected"
except OSError as e:
    net = f"refused: {{e}}"
Path("net.txt").write_text(net)
Path("seen.json").write_text(json.dumps(seen))
if MODE == "boom":
    raise ValueError("boom in the notebook")
scale = json.loads((inp / "ens-models" / "model.json").read_text())["scale"]
ids = [r["image_id"] for r in csv.DictReader(open(inp / "{slug}" / "sample_submission.csv"))]
big = len(ids) > 3  # the hidden test set is larger than the public one
if MODE == "throws" and big:
    raise RuntimeError("CUDA out of memory")
if MODE == "slow" and big:
    time.sleep(60)
rows = [(i, Image.open(inp / "{slug}" / "test" / i).getpixel((0, 0)) // scale) for i in ids]
if MODE == "public-only":  # the ids and labels it saw on the public test, written out as they are
    rows = [("p1.png", 3), ("p2.png", 7), ("p3.png", 1)]
name = "preds.csv" if MODE == "no-csv" and big else "submission.csv"
with open(name, "w") as f:
    f.write("image_id,label\\n" + "".join(f"{{i}},{{l}}\\n" for i, l in rows))
print("wrote", name, len(rows))
"""


def _kernel(tmp_path: Path, fake: FakeKaggle, name: str, mode: str = "good", internet: bool = False,
            datasets=("alice/ens-models",), kernel_type: str = "script", slug: str = "ens-sub") -> Path:
    """A kernel folder (kernel-metadata.json and the code) for kernel alice/<slug>."""
    folder = tmp_path / "kernels" / name
    folder.mkdir(parents=True)
    code = NOTEBOOK.format(mode=mode, port=fake.port, slug=SLUG)
    if kernel_type == "notebook":
        cells = [{"cell_type": "markdown", "metadata": {}, "source": ["# not code"]}]
        cells += [{"cell_type": "code", "metadata": {}, "execution_count": None, "outputs": [],
                   "source": part.splitlines(keepends=True)} for part in code.split("\nif MODE")]
        for cell in cells[2:]:
            cell["source"][0:0] = ["if MODE"]
        (folder / "nb.ipynb").write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4,
                                                     "nbformat_minor": 5}))
    else:
        (folder / "nb.py").write_text(code)
    meta = {"id": f"alice/{slug}", "title": slug, "code_file": "nb.ipynb" if kernel_type == "notebook" else "nb.py",
            "language": "python", "kernel_type": kernel_type, "is_private": True, "enable_gpu": False,
            "enable_internet": internet, "dataset_sources": list(datasets), "competition_sources": [SLUG]}
    (folder / "kernel-metadata.json").write_text(json.dumps(meta))
    return folder


# ---------------------------------------------------------------------------------------------------------------


def test_get_competition_and_csv_refused_on_a_kernels_only_competition(fake, tmp_path):
    fake.kernels_only = True
    csv_path = tmp_path / "sub.csv"
    csv_path.write_text("image_id,label\np1.png,3\n")
    got = client(fake, tmp_path, f"""
        from kagglesdk.competitions.types.competition_api_service import ApiGetCompetitionRequest
        from requests import HTTPError
        def comp(name):
            req = ApiGetCompetitionRequest(); req.competition_name = name
            with api.build_kaggle_client() as k:
                return k.competitions.competition_api_client.get_competition(req)
        c = comp({SLUG!r})
        try:
            comp("nope")
            other = None
        except HTTPError as e:
            other = e.response.status_code
        try:
            api.competition_submit({str(csv_path)!r}, "csv", {SLUG!r}, quiet=True)
            csv = "accepted"
        except HTTPError as e:
            csv = [e.response.status_code, e.response.json()["message"]]
        out(dict(ref=c.ref, title=c.title, metric=c.evaluation_metric, only=c.is_kernels_submissions_only,
                 daily=c.max_daily_submissions, other=other, csv=csv))
    """)
    assert got == dict(ref=SLUG, title="Fake Digits", metric="Categorization Accuracy", only=True, daily=5, other=404,
                       csv=[400, "This competition only accepts submissions from notebooks"])
    assert not fake.submissions


def test_dataset_create_status_files_version_and_a_dropped_file(fake, tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset-metadata.json").write_text(json.dumps(
        {"title": "Ens models", "id": "alice/ens-models", "licenses": [{"name": "CC0-1.0"}]}))
    (folder / "model.json").write_bytes(MODEL)
    (folder / "weights.bin").write_bytes(b"\0" * 1000)
    fake.dataset_ready_polls = 2
    fake.drop_files = {"extra.bin"}  # only in the second version
    got = client(fake, tmp_path, f"""
        folder = {str(folder)!r}
        try:
            api.dataset_status("alice/ens-models")
            before = "exists"
        except Exception as e:
            before = type(e).__name__
        r = api.dataset_create_new(folder, quiet=True)
        statuses = [api.dataset_status("alice/ens-models") for _ in range(3)]
        files = sorted((f.name, f.total_bytes) for f in api.dataset_list_files("alice/ens-models").files)
        again = api.dataset_create_new(folder, quiet=True)
        open(folder + "/extra.bin", "wb").write(b"x" * 10)
        v = api.dataset_create_version(folder, "v2", quiet=True)
        files2 = sorted((f.name, f.total_bytes) for f in api.dataset_list_files("alice/ens-models").files)
        files1 = sorted(f.name for f in api.dataset_list_files("alice/ens-models/1").files)
        out(dict(before=before, status=r.status, ref=r.ref, statuses=statuses, files=files, again=again.status,
                 again_error=again.error, version=v.status, files2=files2, files1=files1))
    """)
    assert got["before"] == "HTTPError" and got["status"] == "ok" and got["ref"] == "alice/ens-models"
    assert got["statuses"] == ["blobs_received", "blobs_received", "ready"]
    assert got["files"] == [["model.json", len(MODEL)], ["weights.bin", 1000]]
    assert got["again"] == "error" and "already in use" in got["again_error"]
    assert got["version"] == "ok"  # the client says ok ...
    assert got["files2"] == [["model.json", len(MODEL)], ["weights.bin", 1000]]  # ... but extra.bin is not there
    assert got["files1"] == ["model.json", "weights.bin"]
    versions = fake.datasets["alice/ens-models"]
    assert len(versions) == 2 and versions[0]["private"] and versions[1]["notes"] == "v2"
    assert versions[0]["files"]["model.json"] == (folder / "model.json").read_bytes()
    assert {r.json["name"] for r in fake.requests if r.endpoint == "StartBlobUpload"} == {
        "model.json", "weights.bin", "extra.bin"}

    # a create that Kaggle refuses: status "error", nothing stored
    fake.dataset_error = "Dataset slug is reserved"
    (folder / "dataset-metadata.json").write_text(json.dumps(
        {"title": "Other models", "id": "alice/other-models", "licenses": [{"name": "CC0-1.0"}]}))
    got = client(fake, tmp_path, f"""
        r = api.dataset_create_new({str(folder)!r}, quiet=True)
        out(dict(status=r.status, error=r.error))
    """)
    assert got == dict(status="error", error="Dataset slug is reserved") and "alice/other-models" not in fake.datasets


def test_an_interrupted_create_resumes_with_the_probe(fake, tmp_path):
    """The client keeps its upload state after a failed create; the next try probes the stored blobs (empty PUT with
    Content-Range: bytes */N) instead of uploading again."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "dataset-metadata.json").write_text(json.dumps(
        {"title": "Ens models", "id": "alice/ens-models", "licenses": [{"name": "CC0-1.0"}]}))
    (folder / "model.json").write_bytes(MODEL)
    fake.fail["CreateDataset"] = 500
    code = f"""
        try:
            r = api.dataset_create_new({str(folder)!r}, quiet=True)
            out(r.status)
        except Exception as e:
            out(type(e).__name__)
    """
    assert client(fake, tmp_path, code) == "HTTPError"
    del fake.fail["CreateDataset"]
    assert client(fake, tmp_path, code) == "ok"
    puts = [r for r in fake.requests if r.endpoint == "upload"]
    assert len(puts) == 2 and puts[1].body == b"" and puts[1].headers["Content-Range"] == f"bytes */{len(MODEL)}"
    assert fake.endpoints().count("StartBlobUpload") == 1
    assert fake.datasets["alice/ens-models"][0]["files"] == {"model.json": (folder / "model.json").read_bytes()}


def test_kernel_push_runs_offline_on_the_inputs_and_its_output_downloads(fake, tmp_path):
    fake.add_dataset("alice/ens-models", {"model.json": MODEL})
    good = _kernel(tmp_path, fake, "good")
    notebook = _kernel(tmp_path, fake, "nb", kernel_type="notebook", slug="ens-notebook")
    boom = _kernel(tmp_path, fake, "boom", mode="boom", slug="ens-boom")
    online = _kernel(tmp_path, fake, "online", internet=True, slug="ens-online")
    missing = _kernel(tmp_path, fake, "missing", datasets=["alice/ens-models", "alice/missing"], slug="ens-missing")
    outdir = tmp_path / "out"
    got = client(fake, tmp_path, f"""
        res = {{}}
        for name, folder in [("good", {str(good)!r}), ("nb", {str(notebook)!r}), ("boom", {str(boom)!r}),
                             ("online", {str(online)!r}), ("missing", {str(missing)!r})]:
            r = api.kernels_push(folder)
            res[name] = dict(ref=r.ref, version=r.version_number, error=r.error,
                             invalid=list(r.invalid_dataset_sources), status=wait_kernel(r.ref))
        files, _ = api.kernels_output("alice/ens-sub", {str(outdir)!r})
        res["files"] = sorted(f.rsplit("/", 1)[-1] for f in files)
        out(res)
    """)
    assert got["good"] == dict(ref="alice/ens-sub", version=1, error="", invalid=[], status=["COMPLETE", ""])
    assert got["nb"]["status"] == ["COMPLETE", ""]
    assert got["boom"]["status"] == ["ERROR", "ValueError: boom in the notebook"]
    assert got["online"]["status"] == ["COMPLETE", ""]
    assert got["missing"]["invalid"] == ["alice/missing"] and got["missing"]["error"] == ""  # reported, not raised
    assert got["files"] == ["ens-sub.log", "net.txt", "seen.json", "submission.csv"]
    # what the run saw: the competition's public data and the dataset, no network, the Kaggle-like environment
    expected_inputs = ["digits/sample_submission.csv", "digits/test/p1.png", "digits/test/p2.png",
                       "digits/test/p3.png", "ens-models/model.json"]
    assert json.loads((outdir / "seen.json").read_text()) == expected_inputs
    run = fake.kernel_version("alice/ens-sub").run
    assert run.kind == "push" and run.inputs == expected_inputs and run.returncode == 0 and run.seconds > 0
    assert (outdir / "net.txt").read_text() == "refused: network is disabled in this notebook"
    assert (outdir / "submission.csv").read_text() == "image_id,label\np1.png,3\np2.png,7\np3.png,1\n"
    log = (outdir / "ens-sub.log").read_text()
    assert f"root {run.root / 'kaggle'} run type Batch rerun None proxy None" in log and "wrote submission.csv 3" in log
    nb_run = fake.kernel_version("alice/ens-notebook").run
    assert "# not code" not in (nb_run.working / "__notebook__.py").read_text()
    assert (nb_run.working / "submission.csv").read_bytes() == (outdir / "submission.csv").read_bytes()
    assert (fake.kernel_version("alice/ens-online").run.working / "net.txt").read_text() == "connected"
    assert fake.kernel_version("alice/ens-missing").dataset_sources == ["alice/ens-models"]
    saved = fake.kernel_version("alice/ens-sub")
    assert saved.enable_internet is False and saved.competition_sources == [SLUG] and saved.kernel_type == "script"

    # a push Kaggle refuses comes back in the response; an output name escaping the folder is refused by the client
    fake.kernel_error = "Notebook slug is reserved"
    fake.output_extra = {"../evil.csv": b"pwned"}
    got = client(fake, tmp_path, f"""
        r = api.kernels_push({str(good)!r})
        try:
            api.kernels_output("alice/ens-sub/1", {str(tmp_path / "out2")!r})
            refused = ""
        except ValueError as e:
            refused = str(e)
        out(dict(error=r.error, version=r.version_number, refused=refused))
    """)
    assert got["error"] == "Notebook slug is reserved" and got["version"] == 0
    assert got["refused"].startswith("Refusing to download '../evil.csv'") and not (tmp_path / "evil.csv").exists()
    assert len(fake.kernels["alice/ens-sub"]) == 1


def test_code_submissions_are_scored_by_a_rerun_on_the_hidden_data(fake, tmp_path):
    fake.add_dataset("alice/ens-models", {"model.json": MODEL})
    fake.rerun_timeout = 5  # the "slow" rerun sleeps 60 s; listed PENDING until then
    modes = ["good", "public-only", "throws", "slow", "no-csv"]  # versions 1..5 of alice/ens-sub
    folders = [_kernel(tmp_path, fake, mode, mode=mode) for mode in modes]
    boom = _kernel(tmp_path, fake, "boom", mode="boom", slug="ens-boom")
    online = _kernel(tmp_path, fake, "online", internet=True, slug="ens-online")
    got = client(fake, tmp_path, f"""
        from requests import HTTPError
        res = dict(subs={{}}, refused={{}})
        for folder in {[str(f) for f in folders]!r}:
            r = api.kernels_push(folder)
            assert wait_kernel(r.ref + "/" + str(r.version_number))[0] == "COMPLETE"
            s = api.competition_submit_code("submission.csv", "v" + str(r.version_number), {SLUG!r},
                                            kernel="alice/ens-sub", kernel_version=r.version_number, quiet=True)
            res["subs"][str(s.ref)] = "v" + str(r.version_number)
        for name, folder in [("boom", {str(boom)!r}), ("online", {str(online)!r})]:
            r = api.kernels_push(folder)
            wait_kernel(r.ref)
        for name, kernel, version, file in [("boom", "alice/ens-boom", 1, "submission.csv"),
                                            ("online", "alice/ens-online", 1, "submission.csv"),
                                            ("unknown", "alice/ens-sub", 9, "submission.csv"),
                                            ("nofile", "alice/ens-sub", 1, "other.csv")]:
            try:
                api.competition_submit_code(file, "x", {SLUG!r}, kernel=kernel, kernel_version=version, quiet=True)
                res["refused"][name] = "accepted"
            except HTTPError as e:
                res["refused"][name] = [e.response.status_code, e.response.json()["message"]]
        res["first"] = {{res["subs"].get(str(s.ref)): s.status.name for s in api.competition_submissions({SLUG!r})}}
        end = time.monotonic() + 40
        while True:
            subs = api.competition_submissions({SLUG!r})
            if all(s.status.name != "PENDING" for s in subs) or time.monotonic() > end:
                break
            time.sleep(0.2)
        res["final"] = {{res["subs"][str(s.ref)] if str(s.ref) in res["subs"] else s.ref:
                        [s.status.name, s.public_score, s.error_description, s.file_name] for s in subs}}
        one = api.get_submission(next(s.ref for s in subs if res["subs"].get(str(s.ref)) == "v1"))
        res["one"] = [one.status.name, one.public_score]
        try:
            api.get_submission(1)
        except HTTPError as e:
            res["one_unknown"] = e.response.status_code
        out(res)
    """)
    assert got["one"] == ["COMPLETE", "1.00000"] and got["one_unknown"] == 404
    assert got["first"]["v4"] == "PENDING"  # listed PENDING while its rerun runs
    assert got["final"] == {
        "v1": ["COMPLETE", "1.00000", "", "submission.csv"],
        "v2": ["ERROR", "", "Submission Scoring Error: Could not find id 'h1.png' in the submission", "submission.csv"],
        "v3": ["ERROR", "", "Notebook Threw Exception", "submission.csv"],
        "v4": ["ERROR", "", "Notebook Timeout", "submission.csv"],
        "v5": ["ERROR", "", "Submission CSV Not Found", "submission.csv"],
    }
    assert got["refused"]["boom"][0] == 400 and "failed" in got["refused"]["boom"][1]
    assert got["refused"]["online"] == [400, "Notebook internet must be disabled for this competition"]
    assert got["refused"]["unknown"][0] == 404 and got["refused"]["nofile"][0] == 400
    # the rerun ran the same code on the hidden data, and was told it is a rerun
    sub = next(s for s in fake.submissions if s.kernel_version == 1)
    assert sub.kernel == "alice/ens-sub" and sub.score == 1.0 and sub.rerun.kind == "rerun"
    assert sub.rerun.inputs == ["digits/sample_submission.csv"] + [f"digits/test/{n}" for n in HIDDEN] + [
        "ens-models/model.json"]
    assert "rerun True" in sub.rerun.stdout and b"h5.png,9" in sub.content
    assert next(s for s in fake.submissions if s.kernel_version == 4).rerun.timed_out
    assert next(s for s in fake.submissions if s.kernel_version == 3).rerun.stderr.strip().endswith(
        "RuntimeError: CUDA out of memory")
    assert len(fake.submissions) == 5 and fake.wait_runs(10)
