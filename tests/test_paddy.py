"""The seed's paddy ensembles, end to end on paddy-shaped data the tests make (pretrained off: no downloads)."""

import shutil

import pytest
from PIL import Image

from conftest import REPO, ens
from paddy_like import CLASSES, make_paddy_like
from pipelines.config import Prepare, Project, load_competition
from pipelines.data import load_data, prepare_data
from pipelines.plan import plan_ensemble
from pipelines.run import gather_members

pytestmark = pytest.mark.slow

# CPU-sized runs of the seed's members at their configured sizes
QUICK = ["members.*.pretrained=false", "members.*.epochs=1", "members.*.batch_size=8", "members.*.tta.n=1",
         "members.*.num_workers=0"]


@pytest.fixture(scope="module")
def paddy_project(tmp_path_factory):
    root = tmp_path_factory.mktemp("paddy") / "project"
    data = make_paddy_like(tmp_path_factory.mktemp("paddy-data") / "paddy")
    (root / "competitions").mkdir(parents=True)
    text = (REPO / "competitions/paddy.yaml").read_text()
    (root / "competitions/paddy.yaml").write_text(text + f"\ndata_dir: {data}\n")
    shutil.copytree(REPO / "ensembles/paddy", root / "ensembles/paddy")
    return root


def test_every_member_of_every_paddy_ensemble_trains_and_predicts_at_its_size(paddy_project, tmp_path):
    seen = {}
    for name in ("first", "second", "improved", "seed-final"):
        g = gather_members(Project(paddy_project), f"paddy/{name}.yaml", QUICK)
        for o in g.outcomes:
            assert o.entry.arrays["test_tta"].shape == (4, 10) and o.entry.vocab == sorted(CLASSES)
            assert [h["size"] for h in o.entry.meta["history"]] == [o.member.size]  # trained at the configured size
            seen[(o.member.arch, o.member.size)] = o.trained
    assert set(seen) == {("resnet50", 224), ("resnet101", 224), ("convnext_small_in22k", 224),
                         ("convnext_small_in22k", 299), ("convnext_small_in22k", 320),
                         ("vit_small_patch16_224", 224), ("vit_small_patch16_224", 244)}
    # final: seed-final's members in stages. Every stage size is one its network takes (the plan's FLOP count is a
    # forward pass at each); training in stages is test_run_paddy_final_quickly_end_to_end's, at small sizes, to
    # keep this file's time down
    plan = plan_ensemble(Project(paddy_project), "paddy/final.yaml", device="cpu", memo=tmp_path / "flops.json")
    assert {(m.arch, s) for m in plan.members for s, _ in m.stages} == {
        ("convnext_small_in22k", 160), ("convnext_small_in22k", 224), ("convnext_small_in22k", 299),
        ("convnext_small_in22k", 320), ("vit_small_patch16_224", 176), ("vit_small_patch16_224", 244)}
    assert all(m.problem is None and all(m.flops.values()) for m in plan.members)
    assert [m.stages[-1][0] for m in plan.members] == [320, 299, 224, 244]  # the seed's sizes, last
    # the shared members were trained once, by the first ensemble that had them, then read from the cache
    prepared = list((paddy_project / "cache/prepared/paddy").glob("max480-*"))
    assert len(prepared) == 1 and not list((paddy_project / "cache/prepared/paddy").glob("*.building-*"))
    sample = next(prepared[0].glob("train_images/*/*.jpg"))
    assert Image.open(sample).size == (360, 480)  # 480x640 portrait, longer side 480


def test_run_paddy_final_quickly_end_to_end(paddy_project):
    # final's members train in stages: two small ones here (`size`/`epochs` would be ignored)
    result = ens("run", "paddy/final.yaml", "members.*.pretrained=false", "members.*.stages=[[48, 1], [64, 1]]",
                 "members.*.batch_size=8", "members.*.tta.n=1", "members.*.num_workers=0",
                 "--no-submit", cwd=paddy_project, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checked against the sample" in result.stdout
    csv_file = next((paddy_project / "submissions/paddy").glob("*-final.csv"))
    rows = csv_file.read_text().splitlines()
    assert rows[0] == "image_id,label" and len(rows) == 5 and all(r.split(",")[1] in CLASSES for r in rows[1:])
    # decode: true: batches came from copies decoded once per stage size, shared by the four members
    decoded = {p.name.split("-")[0] for p in (paddy_project / "cache/decoded/paddy").iterdir() if p.is_dir()}
    assert decoded == {"48x48", "64x64"}


def test_prepared_copies_are_keyed_by_their_settings(paddy_project):
    project = Project(paddy_project)
    data = load_data(project, load_competition(project, "paddy"))
    small = prepare_data(data, Prepare(max_size=128), project.cache)
    again = prepare_data(data, Prepare(max_size=128), project.cache)
    other = prepare_data(data, Prepare(max_size=128, quality=50), project.cache)
    assert small.root == again.root != other.root and small.root != data.root
    assert small.train_paths == data.train_paths and small.test_ids == data.test_ids
    assert max(Image.open(small.root / data.test_paths[0]).size) == 128
