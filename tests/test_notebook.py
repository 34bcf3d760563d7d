"""Code competitions, here (no Kaggle): the notebook's dataset (content-addressed, ens as a wheel), the notebook run
offline in a child process with the network refused, reproducing exactly what `ens run` cached."""

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, make_project

from pipelines.config import Project
from pipelines.errors import EnsError

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

# the conftest's tiny defaults with two random TTA passes; a decoded member and a weighted one
NOTEBOOK_TINY = TINY.split("members:")[0].replace("tta: {n: 1}", "tta: {n: 2}") + """\
members:
  - {name: convnext, arch: test_convnext, decode: true}
  - {name: resnet, arch: test_resnet, weight: 2}
"""


def notebook_project(root: Path, digits_data: Path, extra: str = "", ensembles=None) -> Path:
    make_project(root, digits_data, ensembles or {"tiny": NOTEBOOK_TINY})
    comp = root / "competitions" / "digits.yaml"
    comp.write_text(comp.read_text() + "kaggle: digits\nsubmission: notebook\n" + extra)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_data):
    """The tiny notebook ensemble trained once: (project, gathered, csv written from the cached probabilities)."""
    from pipelines.run import run_ensemble

    root = notebook_project(tmp_path_factory.mktemp("nb") / "project", digits_data,
                            "notebook: {runtime_hours: 1, hidden_test_images: 1000}\n")
    result = run_ensemble(Project(root), "digits/tiny.yaml", submit=False)
    return root, result.gathered, result.csv


def chosen_of(g):
    from pipelines.notebook.bundle import Chosen

    return Chosen(g.path.stem, g.outcomes, [o.member.weight for o in g.outcomes], g.ensemble.combine, g.ensemble.probs)


def delivery(root: Path, g, csv: Path, said: list):
    from pipelines.notebook.push import NotebookDelivery

    return NotebookDelivery(Project(root), g.competition, g.data.root, list(g.data.vocab), csv, csv.name, "m",
                            root / "submissions" / "digits" / "history.csv", said.append)


def test_the_wheel_is_byte_stable_and_ens_is_imported_from_it(tmp_path):
    from pipelines.notebook.bundle import write_wheel

    a, b = write_wheel(_mkdir(tmp_path / "a")), write_wheel(_mkdir(tmp_path / "b"))
    assert a.read_bytes() == b.read_bytes()  # the same sources, the same bytes: the content hash holds
    names = zipfile.ZipFile(a).namelist()
    assert "pipelines/notebook/offline.py" in names and "pipelines/data/fastai_parts.py" in names
    assert any(n.endswith(".dist-info/RECORD") for n in names)
    # put first on sys.path (as the notebook does), it wins over the project's editable install
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import pipelines.notebook.offline as m, pipelines.config as c; "
            "print(m.__file__); print(c.__file__)")
    out = subprocess.run([sys.executable, "-P", "-c", code, str(a)], capture_output=True, text=True, cwd=tmp_path,
                         check=True).stdout.split()
    assert all(line.startswith(str(a)) for line in out), out


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True)
    return p


def test_the_dataset_is_named_by_its_content(trained, tmp_path):
    from pipelines.notebook.bundle import MANIFEST, build

    root, g, _ = trained
    chosen = chosen_of(g)
    first = build(Project(root), g, chosen)
    again = build(Project(root), g, chosen)
    assert again.content == first.content and again.folder == first.folder
    manifest = json.loads((first.folder / MANIFEST).read_text())
    assert [m["name"] for m in manifest["members"]] == ["convnext", "resnet"]
    assert manifest["blend"] == {"method": "mean", "power": 2.0, "weights": [1.0, 2.0]}
    assert manifest["competition"]["kaggle"] == "digits" and manifest["vocab"] == [str(i) for i in range(10)]
    on_disk = {p.name: p.stat().st_size for p in first.folder.iterdir() if p.name != "dataset-metadata.json"}
    assert on_disk == first.files  # every file the manifest lists, at its size
    other = build(Project(root), g, dataclasses.replace(chosen, weights=[1.0, 1.0]))
    assert other.content != first.content  # another blend, another dataset version


def test_the_notebook_reproduces_the_cached_test_probabilities(trained):
    """Each kept model predicts the test images alone exactly as `ens run` did after the validation pass: the
    TTA's random passes are seeded per split (with one seed for both, the test draws depended on the validation
    pass, which a notebook does not make)."""
    from pipelines.notebook.offline import _offline_data, member_test_probs

    _, g, _ = trained
    data = _offline_data(g.competition, g.data.root, list(g.data.vocab), g.data.test_paths)
    for o in g.outcomes:
        model = {"member": o.entry.meta["member"], "normalize": o.entry.meta["normalize"],
                 "file": o.entry.model_path.name}
        got = member_test_probs(model, o.entry.model_path.parent, data, "tta")
        np.testing.assert_allclose(got, o.entry.probs("test", "tta"), atol=1e-6, err_msg=o.member.name)


def test_the_notebook_runs_here_offline_and_writes_the_runs_csv(trained):
    root, g, csv = trained
    said = []
    b, kernel_dir = delivery(root, g, csv, said).check_here(g, chosen_of(g))
    meta = json.loads((kernel_dir / "kernel-metadata.json").read_text())
    assert meta["enable_internet"] is False and meta["competition_sources"] == ["digits"]
    assert meta["dataset_sources"] == ["owner/ens-digits-tiny-models"] and meta["kernel_type"] == "script"
    assert any("same 359 rows" in line and "1000 hidden test images" in line for line in said), said


def test_a_slow_notebook_is_refused_before_any_upload(trained, tmp_path):
    from pipelines.config import Competition

    root, g, csv = trained
    slow = g.competition.model_copy(update={"notebook": g.competition.notebook.model_copy(
        update={"hidden_test_images": 10**9})})
    d = delivery(root, g, csv, [])
    d.comp = slow
    with pytest.raises(EnsError, match="would need about .* over 90%"):
        d.check_here(g, chosen_of(g))
    assert isinstance(slow, Competition)


def test_the_local_run_refuses_the_network(tmp_path):
    from pipelines.notebook.verify import run_script

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    root = tmp_path / "kaggle"
    (root / "working").mkdir(parents=True)
    script = tmp_path / "probe.py"
    script.write_text(f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=5)\n"
                      "open('submission.csv', 'w').write('x')\n")
    try:
        with pytest.raises(EnsError, match="network is disabled") as e:
            run_script(script, root, "submission.csv", timeout=60)
    finally:
        server.close()
    assert "\n" not in str(e.value)
    assert not (root / "working" / "submission.csv").exists()


def test_a_differing_csv_is_named(tmp_path):
    from pipelines.config import Competition
    from pipelines.notebook.verify import same_submission

    comp = Competition(name="x")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("image_id,label\n1.png,3\n2.png,4\n")
    b.write_text("image_id,label\n1.png,3\n2.png,5\n")
    same_submission(a, a, comp)
    with pytest.raises(EnsError, match=r"differ from the cached ones on 1 of 2 rows \(first 2.png: 4 vs 5\)"):
        same_submission(a, b, comp)


def test_stacking_is_refused_for_a_notebook(trained):
    from pipelines.config import Combine
    from pipelines.notebook.bundle import build

    root, g, _ = trained
    chosen = chosen_of(g)
    chosen.combine = Combine(method="stack")
    with pytest.raises(EnsError, match="combine: stack is not available in a notebook"):
        build(Project(root), g, chosen)


def test_libraries_of_another_version_come_from_the_dataset(trained, tmp_path):
    """Where the image's timm/fastai differ from those the members were trained with, the notebook imports the
    dataset's wheels of them (built from this installation) and still writes the same CSV."""
    from pipelines.notebook.bundle import MANIFEST, build
    from pipelines.notebook.script import SCRIPT, dataset_slug, write_kernel
    from pipelines.notebook.verify import kaggle_tree, run_script, same_submission

    root, g, csv_path = trained
    b = build(Project(root), g, chosen_of(g))
    assert set(b.manifest["pinned"]) == {"timm", "fastai", "fastcore", "fasttransform"}
    dataset = tmp_path / "dataset"
    shutil.copytree(b.folder, dataset)
    manifest = json.loads((dataset / MANIFEST).read_text())
    for pin in manifest["pinned"].values():
        pin["version"] = "0.0.0"  # as if this image had others
    (dataset / MANIFEST).write_text(json.dumps(manifest))
    write_kernel(tmp_path / "kernel", g.competition, "tiny", b, "owner")
    tree = kaggle_tree(tmp_path / "check", g.competition, g.data.root, dataset, dataset_slug(g.competition, "tiny"))
    run = run_script(tmp_path / "kernel" / SCRIPT, tree, "submission.csv", timeout=600)
    for name in ("timm", "fastai"):
        wheel = manifest["pinned"][name]["wheel"]
        assert f"/{wheel}/" in run.timing["libraries"][name], run.timing["libraries"]
        assert f"ens: {name} 0.0.0 from the dataset" in run.log
    same_submission(run.csv, csv_path, g.competition)
