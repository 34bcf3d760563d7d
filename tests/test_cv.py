"""Cross-validated ensembles (`validation: cv`): one model per fold, each its own cache entry; out-of-fold (OOF)
probabilities where every training image is predicted by the one model that did not see it; test predictions
from the fold mean or a refit; blends scored honestly by nested cross-validation; a killed fold resumes."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import copy_project, ens, make_project
from pipelines import ensemble
from pipelines.config import Project
from pipelines.data import cv_folds, fold_data, load_data
from pipelines.errors import EnsError
from pipelines.run import gather_members, run_ensemble
from pipelines.submission import check_submission

pytestmark = pytest.mark.slow

CV = """\
competition: digits
validation: cv
combine: COMBINE
defaults: {pretrained: false, size: 32, epochs: 1, lr: 0.005, batch_size: 64, num_workers: 0, tta: {n: 1},
           aug_transforms: {do_flip: false, max_rotate: 10}}
members:
  - {name: effnet, arch: test_efficientnet}
  - {name: resnet, arch: test_resnet}
"""


def cv_project(root, digits_data, ensembles=None, extra=""):
    return make_project(root, digits_data, ensembles or {"cv": CV.replace("COMBINE", "mean")},
                        cv=f"{{folds: 3, seed: 7{extra}}}")


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory, digits_data):
    """A 3-fold, two-member ensemble with a refit, trained once: (project root, RunResult)."""
    root = cv_project(tmp_path_factory.mktemp("cv") / "p", digits_data)
    return root, run_ensemble(Project(root), "digits/cv.yaml", ["refit=full"])


def test_each_oof_row_comes_from_the_one_model_that_did_not_see_it(cv_run):
    root, result = cv_run
    g = result.gathered
    data, fold_ids = g.data, np.array(g.fold_ids)
    for o in result.members:
        arrays = o.entry.arrays
        assert [str(i) for i in arrays["valid_ids"]] == data.train_paths  # every training image, once
        assert np.array_equal(arrays["valid_folds"], fold_ids)
        units = {u.fold: u for u in o.folds}
        assert sorted(units, key=str) == [0, 1, 2, "refit"]
        for fold in range(3):
            entry = units[fold].entry
            held = [p for p, f in zip(data.train_paths, fold_ids) if f == fold]
            assert sorted(map(str, entry.arrays["valid_ids"])) == sorted(held)
            # that model trained on the other folds only: its DataLoaders' training items exclude the held images
            fd = fold_data(data, list(fold_ids), fold)
            trained_on = {p for p, v in zip(fd.train_paths, fd.is_valid) if not v}
            assert trained_on.isdisjoint(held) and len(trained_on) + len(held) == len(data.train_paths)
            rows = [data.train_paths.index(str(i)) for i in entry.arrays["valid_ids"]]
            np.testing.assert_array_equal(arrays["valid_tta"][rows], entry.arrays["valid_tta"])
        # the fold models are distinct cache entries, and the refit validated on nothing
        assert len({u.entry.key for u in o.folds}) == 4
        assert units["refit"].entry.arrays["valid_tta"].shape == (0, len(data.vocab))
        # OOF accuracy is recomputed from the joined rows
        assert o.entry.meta["metrics"]["tta_accuracy"] == pytest.approx(
            ensemble.accuracy(arrays["valid_tta"], arrays["valid_targets"]))


def test_refit_predicts_the_test_set_and_fold_mean_without_it_both_give_checked_csvs(cv_run, tmp_path):
    root, refit = cv_run
    comp, data = refit.competition, refit.gathered.data
    for o in refit.members:
        units = {u.fold: u for u in o.folds}
        np.testing.assert_array_equal(o.entry.arrays["test_tta"], units["refit"].entry.arrays["test_tta"])
    assert check_submission(refit.csv, data.root / comp.sample_submission, comp, data.vocab) == len(data.test_paths)

    mean = run_ensemble(Project(copy_project(root, tmp_path / "p")), "digits/cv.yaml")
    assert mean.trained == []  # the fold models are cached; only the refit is not used
    for o in mean.members:
        folds = [u.entry.arrays["test_tta"] for u in o.folds]
        assert len(folds) == 3
        np.testing.assert_allclose(o.entry.arrays["test_tta"], np.mean(folds, axis=0), atol=1e-6)
    assert check_submission(mean.csv, data.root / comp.sample_submission, comp, data.vocab) == len(data.test_paths)
    # the CSV holds the blend of the fold means
    blended = ensemble.combine([o.entry.arrays["test_tta"] for o in mean.members])
    written = pd.read_csv(mean.csv).set_index(comp.id_column)[comp.target_column].astype(str)
    assert list(written.loc[data.test_ids]) == [data.vocab[i] for i in blended.argmax(1)]
    assert mean.valid_score == pytest.approx(ensemble.accuracy(
        ensemble.combine([o.entry.arrays["valid_tta"] for o in mean.members]), mean.members[0].entry.arrays["valid_targets"]))


@pytest.mark.parametrize("method", ["hill_climb", "stack", "greedy"])
def test_a_learned_blend_reports_its_nested_cv_score_computed_independently(cv_run, tmp_path, method):
    root = copy_project(cv_run[0], tmp_path / "p")
    (root / "ensembles/digits/learned.yaml").write_text(CV.replace("COMBINE", method))
    result = run_ensemble(Project(root), "digits/learned.yaml")
    assert result.trained == []
    p = [o.entry.arrays["valid_tta"].astype("float64") for o in result.members]
    y, folds = result.members[0].entry.arrays["valid_targets"], np.array(result.gathered.fold_ids)
    held_out = np.zeros_like(p[0])
    for k in range(3):  # learned on two folds' OOF rows, applied to the third
        train, test = folds != k, folds == k
        if method == "stack":
            model = ensemble.stacking_fit([q[train] for q in p], y[train])
            held_out[test] = ensemble.stacking_predict(model, [q[test] for q in p])
        elif method == "hill_climb":
            w, _ = ensemble.hill_climb([q[train] for q in p], y[train], "accuracy")
            held_out[test] = ensemble.clipped_blend([q[test] for q in p], w)
        else:
            counts = ensemble.greedy_selection([q[train] for q in p], y[train], "accuracy", 100)[0]
            held_out[test] = ensemble.combine([q[test] for q in p], counts)
    assert result.valid_score == pytest.approx(ensemble.accuracy(held_out, y))
    assert result.blended.learned
    history = pd.read_csv(root / "submissions/digits/history.csv")
    assert float(history["valid_score"].iloc[-1]) == pytest.approx(result.valid_score, abs=1e-6)  # the honest one


def test_quick_look_at_some_folds_then_the_rest(digits_data, tmp_path):
    root = cv_project(tmp_path / "p", digits_data)
    out = ens("run", "digits/cv.yaml", "--folds", "0", "--no-submit", cwd=root)
    assert out.returncode == 0, out.stderr
    assert "no blend and no submission yet" in out.stdout and "fold 1, fold 2" in out.stdout
    assert not (root / "submissions").exists()
    assert len([p for p in (root / "cache/digits").iterdir() if not p.name.startswith(".") and p.name != "models"]) == 2
    rest = run_ensemble(Project(root), "digits/cv.yaml", folds=[1, 2])
    hows = {(u.member.name, u.fold): u.how for u in rest.gathered.units}
    assert hows == {(m, f): ("cached" if f == 0 else "trained") for m in ("effnet", "resnet") for f in range(3)}
    assert rest.csv is not None and rest.csv.is_file()  # every fold done: blended and written
    for bad in (["--folds", "3"], ["--folds", "a"]):
        out = ens("run", "digits/cv.yaml", *bad, cwd=root)
        assert out.returncode != 0 and "--folds" in out.stderr and "Traceback" not in out.stderr


def test_a_fold_killed_mid_training_resumes_at_that_fold_and_epoch(digits_data, tmp_path):
    import torch

    one = CV.replace("COMBINE", "mean").replace("epochs: 1", "epochs: 3").split("  - {name: resnet")[0]
    root = cv_project(tmp_path / "p", digits_data, ensembles={"one": one})
    cache = root / "cache/digits"

    def state():
        entries = [p for p in cache.iterdir() if not p.name.startswith(".") and p.name != "models"] if cache.is_dir() else []
        for path in cache.glob(".partial-*/checkpoint.pth"):
            try:
                return len(entries), torch.load(path, map_location="cpu", weights_only=False)["epochs_done"]
            except Exception:
                pass
        return len(entries), None

    # Ctrl-C in fold 1's third epoch (the second time a fold reaches train epoch 2), at that named point
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "digits/one.yaml"], cwd=root,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", ENS_TEST_KILL_AT="SIGINT after train epoch 2 #2"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 130, proc.stdout[-2000:]
    assert state() == (1, 2)  # fold 0 done, fold 1 at epoch 2

    resumed = run_ensemble(Project(root), "digits/one.yaml")
    units = {u.fold: u for u in resumed.gathered.units}
    assert units[0].how == "cached" and units[1].how == "resumed" and units[2].how == "trained"
    assert units[1].entry.meta["resumed_at"] == "train epoch 3 of 3"
    reference = run_ensemble(Project(cv_project(tmp_path / "ref", digits_data, ensembles={"one": one})), "digits/one.yaml")
    np.testing.assert_allclose(resumed.members[0].entry.arrays["valid_tta"],
                               reference.members[0].entry.arrays["valid_tta"], atol=1e-6)


def test_groups_from_a_csv_never_straddle_folds_and_bad_groups_say_so(digits_data, tmp_path):
    root = cv_project(tmp_path / "p", digits_data, extra=", group_column: writer, groups_csv: writers.csv")
    comp_text = (root / "competitions/digits.yaml").read_text()
    data_dir = digits_data
    names = sorted(p.name for p in (data_dir / "train_images").glob("*/*.png"))
    writers = {n: f"w{int(n[6:10]) % 40}" for n in names}  # 40 writers, each with images of many classes
    groups_csv = tmp_path / "writers.csv"
    pd.DataFrame({"image_id": list(writers), "writer": list(writers.values())}).to_csv(groups_csv, index=False)
    (root / "competitions/digits.yaml").write_text(comp_text.replace("groups_csv: writers.csv", f"groups_csv: {groups_csv}"))
    proj = Project(root)
    from pipelines.config import load_competition

    data = load_data(proj, load_competition(proj, "digits"))
    folds = cv_folds(data)
    by_writer = {}
    for path, f in zip(data.train_paths, folds):
        by_writer.setdefault(writers[path.split("/")[-1]], set()).add(f)
    assert all(len(fs) == 1 for fs in by_writer.values()) and set(folds) == {0, 1, 2}
    assert cv_folds(data) == folds  # deterministic
    pd.DataFrame({"image_id": list(writers)[1:], "writer": list(writers.values())[1:]}).to_csv(groups_csv, index=False)
    with pytest.raises(EnsError, match="1 training images have no writer"):
        cv_folds(data)


def test_cv_configuration_errors_are_one_line(project):
    root = project
    (root / "ensembles/digits/bad.yaml").write_text(CV.replace("COMBINE", "mean").replace("validation: cv", "refit: full"))
    out = ens("validate", "digits/bad.yaml", cwd=root)
    assert out.returncode != 0 and "refit: full needs validation: cv" in out.stderr
    out = ens("run", "digits/tiny.yaml", "--folds", "0", cwd=root)
    assert out.returncode != 0 and "--folds needs a cross-validated ensemble" in out.stderr
    (root / "ensembles/digits/typo.yaml").write_text(CV.replace("COMBINE", "hill_climbing"))
    out = ens("validate", "digits/typo.yaml", cwd=root)
    assert out.returncode != 0 and "combine.method" in out.stderr and "hill_climb" in out.stderr
    comp = root / "competitions/digits.yaml"
    comp.write_text(comp.read_text() + "cv: {folds: 3, group_column: plant}\n")
    out = ens("validate", "digits/tiny.yaml", cwd=root)
    assert out.returncode != 0 and "needs cv.groups_csv" in out.stderr and "Traceback" not in out.stderr


def test_ablate_on_oof_rows_with_intervals_fold_scores_and_every_method(cv_run, tmp_path):
    import yaml

    from pipelines.ablate import ablate

    root = copy_project(cv_run[0], tmp_path / "p")
    r = ablate(Project(root), "digits/cv.yaml", cached_only=True)
    g = r.gathered
    assert r.scored_on == "out-of-fold" and r.n_valid == len(g.data.train_paths) and r.n_folds == 3
    y = r.outcomes[0].entry.arrays["valid_targets"]
    p = [o.entry.arrays["valid_tta"] for o in r.outcomes]
    full = ensemble.combine(p)
    for o, row, q in zip(r.outcomes, r.members, p):
        assert row.folds == [u.entry.meta["metrics"]["tta_accuracy"] for u in o.folds if u.fold != "refit"]
        delta, low, high = row.alone_interval
        assert delta == pytest.approx(ensemble.accuracy(q, y) - ensemble.accuracy(full, y))
        assert low <= delta <= high and (low, high) == ensemble.paired_bootstrap(q.argmax(1) == y, full.argmax(1) == y, 1000)[1:]
        assert row.alone_p == pytest.approx(ensemble.mcnemar_p(q.argmax(1) == y, full.argmax(1) == y))
    methods = {m.method: m for m in r.methods}
    assert set(methods) == {"mean", "greedy", "hill_climb", "rank", "power", "stack", "subset"}
    assert methods["mean"].honest == methods["mean"].in_sample == pytest.approx(r.full)
    assert methods["rank"].honest == pytest.approx(ensemble.accuracy(ensemble.rank_average(p), y))
    honest, _ = ensemble.nested_cv_score(p, y, np.array(g.fold_ids), ensemble.stacking_fitter(), "accuracy")
    assert methods["stack"].learned and methods["stack"].honest == pytest.approx(honest)

    out = ens("ablate", "digits/cv.yaml", "--cached-only", "--pick", "hill_climb", "--write",
              "ensembles/digits/hc.yaml", cwd=root)
    assert out.returncode == 0, out.stderr
    for words in ("out-of-fold rows", "95% CI", "per fold", "combine methods", "(nested)"):
        assert words in out.stdout
    written = yaml.safe_load((root / "ensembles/digits/hc.yaml").read_text())
    assert written["combine"] == "hill_climb" and written["validation"] == "cv"


def test_bench_and_eval_use_a_cv_members_fold_models(cv_run, tmp_path):
    from pipelines.evaluate import bench, evaluate_on

    root = copy_project(cv_run[0], tmp_path / "p")
    rows, _ = bench(Project(root), "digits/cv.yaml", batch=4, repeats=1)
    assert [r.models for r in rows] == [3, 3]
    g = gather_members(Project(root), "digits/cv.yaml", cached_only=True)
    for r, o in zip(rows, g.outcomes):
        assert r.disk_mb == pytest.approx(sum(u.entry.model_path.stat().st_size for u in o.folds) / 1e6)
    rows, _ = bench(Project(root), "digits/cv.yaml", ["refit=full"], batch=4, repeats=1)
    assert [r.models for r in rows] == [1, 1]
    # eval on the test images, labelled: the fold models' mean reproduces the cached test probabilities
    answers = pd.read_csv(g.data.root / "solution.csv")
    folder = tmp_path / "labelled"
    for image_id, label in zip(answers["image_id"], answers["label"]):
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        (folder / str(label) / image_id).symlink_to(g.data.root / "test_images" / image_id)
    results, n, _ = evaluate_on(Project(root), "digits/cv.yaml", folder)
    targets = np.array([g.data.vocab.index(str(l)) for l in answers.sort_values("image_id")["label"]])
    o = g.outcomes[0]
    cached = o.entry.arrays["test_plain"][np.argsort([str(i) for i in o.entry.arrays["test_ids"]])]
    assert n == len(targets)
    assert results[o.member.name]["accuracy"][0] == pytest.approx(ensemble.accuracy(cached, targets), abs=1 / n)
