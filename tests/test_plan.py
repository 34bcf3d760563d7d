"""`ens plan`: a dry run on the digits competition: cached flags, parameters and FLOPs of the networks the
learners would train, time estimates from cached members, and nothing trained or written to the cache."""

import json
from pathlib import Path

import pytest
from rich.console import Console

from conftest import copy_project, make_project
from pipelines.config import Project, load_ensemble
from pipelines.plan import plan_ensemble, render


@pytest.fixture(scope="module")
def memo(tmp_path_factory) -> Path:
    """One FLOP memo for the module (never ~/.cache/ens): the first plan builds the networks, the rest read it."""
    return tmp_path_factory.mktemp("flops") / "flops.json"


def entries(root: Path) -> list[str]:
    folder = root / "cache" / "digits"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def no_training(monkeypatch):
    import pipelines.train

    def refuse(*a, **k):
        raise AssertionError("ens plan trained a member")

    monkeypatch.setattr(pipelines.train, "train_member", refuse)


def text(plan) -> str:
    console = Console(record=True, width=200)
    render(plan, console)
    return console.export_text()


def test_params_match_the_learners_network(project, memo, no_training):
    from fastai.vision.all import set_seed

    from pipelines.data import dataloaders, load_data
    from pipelines.models import build_learner

    proj = Project(project)
    over = ["members.convnext.arch=test_vit", "defaults.size=40"]  # a ViT's position embedding follows its size
    plan = plan_ensemble(proj, "digits/tiny", over, device="cpu", memo=memo)
    _, ens, comp = load_ensemble(proj, "digits/tiny", over)
    data = load_data(proj, comp)
    set_seed(0)
    for member, mp in zip(ens.members, plan.members):
        learn, _ = build_learner(dataloaders(data, member, member.final_size), member, metrics=[])
        assert mp.params == sum(p.numel() for p in learn.model.parameters()), member.arch
        assert mp.flops["40"] > 0
    assert not plan.members[0].cached and plan.device == "cpu"
    assert (plan.n_train, plan.n_valid, plan.n_test) == (1152, 286, 359)


def test_flops_scale_with_the_square_of_the_size(project, memo, no_training):
    plan = plan_ensemble(Project(project), "digits/tiny", ["defaults.stages=[[32, 1], [64, 1]]"], device="cpu",
                         memo=memo)
    for m in plan.members:
        assert m.stages == [(32, 1), (64, 1)]
        ratio = m.flops["64"] / m.flops["32"]
        assert 3.5 < ratio < 4.2, (m.arch, ratio)  # convolutions: 4x the pixels; the head does not grow


def test_members_of_one_convnet_arch_share_its_build_and_counts(project, tmp_path, no_training):
    """A convnet takes no size argument, so members of its arch at other final sizes need no other network (the
    paddy ensemble's three ConvNeXts): one build, each size counted once, on the meta device; the same FLOPs as
    a real forward pass on the CPU. A ViT is built for its size: one build per final size."""
    import torch

    from pipelines.models import build_model
    from pipelines.plan import count_flops

    over = [f"members.{m}.arch=test_resnet" for m in ("convnext", "effnet")] + [
        "members.convnext.stages=[[24, 1], [40, 1]]", "members.effnet.stages=[[24, 1], [32, 1]]"]
    built = []
    plan = plan_ensemble(Project(project), "digits/tiny", over, device="cpu", memo=tmp_path / "flops.json",
                         build=lambda *a: built.append((a, str(next(build_model(*a).parameters()).device)))
                         or build_model(*a))
    assert plan.models_built == len(built) == 1 and built[0] == (("test_resnet", 10, 40), "meta")
    with torch.device("cpu"):
        cpu = build_model("test_resnet", 10, 40)
    for m in plan.members:
        assert m.params == sum(p.numel() for p in cpu.parameters())
        for size, flops in m.flops.items():
            assert flops == count_flops(cpu, int(size)), (m.name, size)
    vit = plan_ensemble(Project(project), "digits/tiny", ["members.*.arch=test_vit", "members.convnext.size=48"],
                        device="cpu", memo=tmp_path / "vit.json")
    assert vit.models_built == 2  # 48 and 32: a ViT's position embedding follows its size


def test_a_second_plan_builds_nothing(project, memo, no_training):
    plan_ensemble(Project(project), "digits/tiny", device="cpu", memo=memo)

    def refuse(*a):
        raise AssertionError("built a network the memo holds")

    again = plan_ensemble(Project(project), "digits/tiny", device="cpu", memo=memo, build=refuse)
    assert again.models_built == 0 and all(m.params > 0 for m in again.members)
    stored = json.loads(memo.read_text())
    assert "test_resnet|32|10" in stored


def test_fresh_project_has_nothing_cached_and_a_built_in_estimate(project, memo, no_training):
    from pipelines.plan.estimate import BUILTIN_RATES

    plan = plan_ensemble(Project(project), "digits/tiny", device="cpu", memo=memo)
    assert [m.name for m in plan.to_train] == ["convnext", "effnet", "resnet"]
    assert all(m.est_approx for m in plan.members) and plan.est_from == "the built-in rate for cpu"
    resnet = plan.members[2]  # the built-in seconds per image·GFLOP times the member's work
    assert resnet.est_train_seconds == pytest.approx(BUILTIN_RATES["cpu"][0] * resnet.train_gflops * plan.n_train)
    out = text(plan)
    assert "to train; estimated ~" in out and "est. time ?" not in out
    assert "(~: nothing of digits was trained on cpu yet; from the built-in rate for cpu, scaled by FLOPs)" in out
    assert entries(project) == []


@pytest.mark.slow
def test_tiny_run_is_all_cached_and_nothing_is_trained(tiny_run, memo, no_training):
    root, result = tiny_run
    before = entries(root)
    plan = plan_ensemble(Project(root), "digits/tiny", device="cpu", memo=memo)
    assert [m.cached for m in plan.members] == [True, True, True]
    assert [m.key for m in plan.members] == [o.entry.key for o in result.members]
    assert plan.to_train == [] and plan.est_seconds == 0
    assert "3 cached, 0 to train" in text(plan)
    assert entries(root) == before


@pytest.mark.slow
def test_changed_lr_is_not_cached_and_is_estimated(tiny_run, memo, no_training):
    root, result = tiny_run
    before = entries(root)
    plan = plan_ensemble(Project(root), "digits/tiny", ["members.resnet.lr=0.01"], device="cpu", memo=memo)
    assert [m.cached for m in plan.members] == [True, True, False]
    resnet = plan.members[2]
    # the same arch and the same work as the cached resnet: the estimate is its measured time
    timings = next(o.entry.meta["timings"] for o in result.members if o.member.name == "resnet")
    assert resnet.est_train_seconds == pytest.approx(timings["train_seconds"])
    assert resnet.est_predict_seconds == pytest.approx(timings["predict_seconds"])
    assert "test_resnet" in resnet.est_basis
    assert plan.est_seconds == pytest.approx(resnet.est_seconds)
    # twice the epochs at twice the size: about 8x the work, by FLOPs
    longer = plan_ensemble(Project(root), "digits/tiny", ["members.resnet.stages=[[64, 2]]"], device="cpu", memo=memo)
    ratio = longer.members[2].est_train_seconds / timings["train_seconds"]
    assert 7 < ratio < 8.4
    out = text(plan)
    assert "2 cached, 1 to train; estimated" in out and "from 3 cached members on cpu" in out
    # another device has no measurements: the built-in rate, marked
    cuda = plan_ensemble(Project(root), "digits/tiny", ["members.resnet.lr=0.01"], device="cuda", memo=memo,
                         probe=lambda *a: (lambda mb: mb))
    assert cuda.est_from == "the built-in rate for cuda" and cuda.members[2].est_approx
    assert entries(root) == before


def test_cuda_plans_micro_batches_with_the_injected_probe(project, memo, no_training):
    calls = []

    def probe(factory, size, budget, precision):
        calls.append((size, budget, precision))
        return lambda mb: mb * 1000 if mb <= 16 else None

    over = ["members.resnet.gpu_memory=500B"]  # not even one image fits
    plan = plan_ensemble(Project(project), "digits/tiny", over, device="cuda", bf16_supported=True, probe=probe,
                         memo=memo)
    convnext, effnet, resnet = plan.members
    assert calls[0] == ((32, 32), 7 * 2**30, "bf16")  # the default budget: what an 8 GB card offers
    assert (convnext.memory.micro_batch, convnext.memory.accumulation_steps, convnext.memory.n_acc) == (16, 4, 64)
    assert resnet.memory is None and "member resnet: even a micro-batch of 16" in resnet.problem
    out = text(plan)
    assert "64 = 16 × 4, approximate" in out and "does not fit" in out


def test_a_second_cuda_plan_probes_nothing_the_budget_bounded(project, tmp_path, no_training):
    """Memory plans are memoised per arch, classes, size, precision, budget, batch and card: a second plan probes
    no member again. A plan the card's free memory bounded (another process on it) is a fact of that moment, not
    kept; nor is anything without a known card."""
    from pipelines.memory import SAFETY_MARGIN

    calls, free = [], {"bytes": 64 * 2**30}

    def probe(factory, size, budget, precision):
        def fits(mb):
            calls.append(mb)
            return mb * 1000 if mb <= 16 else None

        fits.limit = lambda: min(budget, free["bytes"]) - SAFETY_MARGIN
        return fits

    def plan(**kw):
        calls.clear()
        return plan_ensemble(Project(project), "digits/tiny", device="cuda", bf16_supported=True, probe=probe,
                             memo=tmp_path / "flops.json", **kw)

    first = plan(card="Fake 8GB 8589934592")
    assert calls and [m.memory.micro_batch for m in first.members] == [16, 16, 16]
    again = plan(card="Fake 8GB 8589934592")
    assert calls == [] and [m.memory.describe() for m in again.members] == [m.memory.describe() for m in first.members]
    assert [m.memory.as_meta() for m in again.members] == [m.memory.as_meta() for m in first.members]
    assert plan(card="Other 24GB 25769803776").members[0].memory.micro_batch == 16 and calls  # another card: probed
    free["bytes"] = 2 * 2**30  # a busy card: the plan is its moment's, not memoised
    plan(card="Busy 8GB 1", overrides=["members.*.gpu_memory=4GiB"])
    plan(card="Busy 8GB 1", overrides=["members.*.gpu_memory=4GiB"])
    assert calls
    plan()  # no card known: probed, never memoised
    assert calls


def test_a_size_too_small_is_a_problem_not_a_crash(project, memo, no_training):
    plan = plan_ensemble(Project(project), "digits/tiny", ["defaults.stages=[[16, 1], [32, 1]]"], device="cpu",
                         memo=memo)
    convnext = plan.members[0]
    assert convnext.flops["16"] is None and "size 16 is too small for test_convnext" in convnext.problem
    assert plan.members[2].problem is None


def test_plan_downloads_nothing(tmp_path, digits_data, monkeypatch):
    import pipelines.kaggle

    def refuse(*a, **k):
        raise AssertionError("ens plan downloaded")

    monkeypatch.setattr(pipelines.kaggle, "download", refuse)
    root = make_project(tmp_path / "p", digits_data)
    (root / "competitions" / "remote.yaml").write_text("kaggle: some-competition\n")
    (root / "ensembles" / "remote").mkdir(parents=True)
    (root / "ensembles" / "remote" / "a.yaml").write_text(
        "competition: remote\nmembers: [{name: a, arch: test_resnet, pretrained: false, size: 32}]\n")
    plan = plan_ensemble(Project(root), "remote/a", device="cpu", memo=tmp_path / "flops.json")
    assert not plan.data_known and not (root / "cache" / "data" / "remote").exists()
    assert "`ens data remote` downloads it" in text(plan)  # tests/test_plan_offline.py: what else it says


def test_a_new_competition_is_estimated_from_another_competitions_models(tiny_run, memo, no_training, tmp_path):
    """Nothing of digits2 trained yet: its members' times come from digits' cached models of the same arch,
    scaled by FLOPs, marked with ~ and a note saying from what."""
    root, result = tiny_run
    project = copy_project(root, tmp_path / "p")
    (project / "competitions/digits2.yaml").write_text((project / "competitions/digits.yaml").read_text())
    (project / "ensembles/digits2").mkdir()
    (project / "ensembles/digits2/tiny.yaml").write_text(
        (project / "ensembles/digits/tiny.yaml").read_text().replace("competition: digits", "competition: digits2"))
    plan = plan_ensemble(Project(project), "digits2/tiny", device="cpu", memo=memo)
    assert [m.cached for m in plan.members] == [False] * 3 and all(m.est_approx for m in plan.members)
    resnet = plan.members[2]
    timings = next(o.entry.meta["timings"] for o in result.members if o.member.name == "resnet")
    assert resnet.est_train_seconds == pytest.approx(timings["train_seconds"])  # the same work on the same images
    assert resnet.est_basis == "1 cached test_resnet model of digits"
    out = text(plan)
    assert "estimated ~" in out
    assert "(~: nothing of digits2 was trained on cpu yet; from " in out and " of digits, scaled by FLOPs)" in out
