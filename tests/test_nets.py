"""ens's own from-scratch nets (`ens:lenet5`, `ens:alexnet_bn`, `ens:cifar_cnn`, from the seeds 000, 003, 004):
trained inside an ensemble on the digits images, seed 004's layer table, parameter counts by hand, naming
rules and errors, and `list_models`."""

import subprocess
import sys

import pytest

from conftest import REPO, make_project
from pipelines.config import Project
from pipelines.errors import ConfigError
from pipelines.models import build_model, check_arch, known_architectures, list_models, split_arch
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow  # trains (fastai members, Ray tasks, notebooks): not in make test-fast

NETS = """\
competition: digits
defaults:
  pretrained: false
  size: 32
  epochs: 2
  lr: 0.005
  batch_size: 64
  num_workers: 0
  aug_transforms: {do_flip: false, max_rotate: 10}
  tta: {n: 0}
members:
  - {name: lenet, arch: "ens:lenet5", lr: 0.01}
  - {name: alexnet, arch: "ens:alexnet_bn", lr: 0.002}
  - {name: cifar, arch: "ens:cifar_cnn"}
"""


@pytest.fixture(scope="module")
def nets_run(tmp_path_factory, digits_data):
    root = make_project(tmp_path_factory.mktemp("nets") / "project", digits_data, {"nets": NETS})
    return root, run_ensemble(Project(root), "digits/nets.yaml")


def test_each_net_trains_in_an_ensemble_above_chance(nets_run):
    _, result = nets_run
    assert result.trained == ["lenet", "alexnet", "cifar"]
    for outcome in result.members:  # 10 classes: chance is 0.1
        accuracy = outcome.entry.meta["metrics"]["plain_accuracy"]
        assert accuracy > 0.6, (outcome.member.name, accuracy)
    assert result.valid_score > 0.8 and result.test_score > 0.8


def test_plain_names_are_ens_when_timm_has_none():
    timm = set(known_architectures()["timm"])
    for name in ("lenet5", "alexnet_bn", "cifar_cnn"):
        assert name not in timm
        assert split_arch(name) == ("ens", name) == split_arch(f"ens:{name}")
    assert split_arch("resnet18") == ("timm", "resnet18")  # timm's names keep their meaning
    assert split_arch("torchvision:alexnet") == ("torchvision", "alexnet")


def _cifar_table():
    """Seed 004's table, row for row: (module type, what to check) — Conv2D rows are conv + ReLU."""
    rows = []
    for c_in, c_out in ((3, 32), (32, 32)):
        rows += [("Conv2d", (c_in, c_out)), ("ReLU", None), ("BatchNorm2d", c_out)]
    rows += [("MaxPool2d", 2), ("Dropout", 0.2)]
    for c_in, c_out in ((32, 64), (64, 32)):
        rows += [("Conv2d", (c_in, c_out)), ("ReLU", None), ("BatchNorm2d", c_out)]
    rows += [("MaxPool2d", 2), ("Dropout", 0.2)]
    rows += [("Conv2d", (32, 128)), ("ReLU", None), ("BatchNorm2d", 128), ("MaxPool2d", 2), ("Dropout", 0.2)]
    rows += [("GridFlatten", 4), ("Linear", (2048, 256)), ("ReLU", None), ("Dropout", 0.45), ("Linear", (256, 10))]
    return rows


def test_cifar_cnn_is_seed_004s_table():
    import torch

    model = build_model("ens:cifar_cnn", 10, 32)
    layers = [*model[0], *model[1]]
    assert len(layers) == len(_cifar_table())
    for layer, (kind, spec) in zip(layers, _cifar_table()):
        assert type(layer).__name__ == kind
        if kind == "Conv2d":
            assert (layer.in_channels, layer.out_channels) == spec
            assert layer.kernel_size == (3, 3) and layer.padding == (1, 1)  # 3×3, 'same'
        elif kind == "BatchNorm2d":
            assert layer.num_features == spec
        elif kind == "MaxPool2d":
            assert layer.kernel_size == spec
        elif kind == "Dropout":
            assert layer.p == spec
        elif kind == "Linear":
            assert (layer.in_features, layer.out_features) == spec
        elif kind == "GridFlatten":
            assert layer.grid == spec
    # the table's shapes at 32×32: the flatten is a plain flatten there (4×4×128 = 2048)
    x = torch.randn(2, 3, 32, 32)
    body = model[0].eval()(x)
    assert body.shape == (2, 128, 4, 4)
    assert torch.equal(model[1][0](body), body.flatten(1))
    # any size: 224 (seed 003's) too
    for size in (24, 64, 224):
        assert model.eval()(torch.randn(2, 3, size, size)).shape == (2, 10)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_by_hand():
    conv = lambda i, o, k: i * o * k * k + o  # noqa: E731
    dense = lambda i, o: i * o + o  # noqa: E731
    bn = lambda c: 2 * c  # noqa: E731  (gamma, beta; running statistics are buffers)
    lenet = conv(3, 6, 5) + conv(6, 16, 5) + dense(16 * 5 * 5, 120) + dense(120, 84) + dense(84, 10)
    assert lenet == 62006
    cifar = (conv(3, 32, 3) + bn(32) + conv(32, 32, 3) + bn(32) + conv(32, 64, 3) + bn(64) + conv(64, 32, 3)
             + bn(32) + conv(32, 128, 3) + bn(128) + dense(2048, 256) + dense(256, 10))
    assert cifar == 611786
    alexnet = (conv(3, 64, 11) + conv(64, 192, 5) + conv(192, 384, 3) + conv(384, 256, 3) + conv(256, 256, 3)
               + bn(256 * 3 * 3) + dense(2304, 1024) + dense(1024, 1024) + dense(1024, 10))
    counts = {"lenet5": lenet, "cifar_cnn": cifar, "alexnet_bn": alexnet}
    for name, expected in counts.items():
        model = build_model(f"ens:{name}", 10, 32)
        assert _count(model) == expected, name
        assert _count(build_model(name, 10, 224)) == expected  # the size changes no weight


def test_alexnet_bn_has_one_batch_norm_between_features_and_classifier():
    from torch import nn

    model = build_model("ens:alexnet_bn", 10, 224)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model[0].modules())  # none in the features
    assert model[1][1] is norms[0]  # first thing after the flattened features


def test_unknown_ens_names_suggest_close_matches():
    with pytest.raises(ConfigError, match=r"x.yaml: members\[0\].arch: unknown ens architecture 'lenet'; "
                                          r"did you mean ens:lenet5"):
        check_arch("ens:lenet", "x.yaml: members[0].arch")
    with pytest.raises(ConfigError, match=r"unknown timm architecture 'cifar_cn'; did you mean ens:cifar_cnn"):
        check_arch("cifar_cn", "x.yaml: members[0].arch")
    check_arch("ens:alexnet_bn", "x.yaml: members[0].arch", False)


def test_pretrained_on_a_from_scratch_net_is_a_clear_error(tmp_path, digits_data):
    with pytest.raises(ConfigError, match=r"members\[0\].pretrained: ens:lenet5 is one of ens's own nets.*"
                                          r"set pretrained: false"):
        check_arch("ens:lenet5", "x.yaml: members[0].arch", True)
    bad = NETS.replace("pretrained: false", "pretrained: true").replace("epochs: 2", "epochs: 1")
    root = make_project(tmp_path / "project", digits_data, {"bad": bad})
    with pytest.raises(ConfigError, match=r"ens:lenet5 is one of ens's own nets.*set pretrained: false") as e:
        run_ensemble(Project(root), "digits/bad.yaml")
    assert "\n" not in str(e.value)


def test_list_models_filters():
    own = list_models("ens:*", False)
    assert [r[0] for r in own] == ["ens:alexnet_bn", "ens:cifar_cnn", "ens:lenet5"]
    assert all(lib == "ens" and note.startswith("from scratch") and "seed" not in note for _, lib, note in own)
    rows = list_models("convnext_small*", False)
    names = {r[0]: r for r in rows}
    assert names["convnext_small"][1] == "timm" and "pretrained tag" in names["convnext_small"][2]
    assert "deprecated alias of convnext_small.fb_in22k" in names["convnext_small_in22k"][2]
    assert "torchvision:convnext_small" in names
    assert all("." not in n for n in names)  # architectures, not their tags
    assert not any(n.startswith("ens:") for n in names)
    tagged = list_models("convnext_small*", True)
    assert "convnext_small.fb_in22k" in {r[0] for r in tagged}
    assert all(lib == "timm" for _, lib, _ in tagged)  # from-scratch nets have no weights
    assert not any(r[0].startswith("ens:") for r in list_models(None, True))
    assert [r[0] for r in list_models("LENET5", False)] == ["ens:lenet5"]  # no wildcard: anywhere, any case
    assert list_models("no_such_model_*", False) == []


def test_list_models_does_not_import_timm_when_memoised():
    known_architectures()  # the memo exists
    code = ("import sys; from pipelines.models import list_models; rows = list_models('convnext*', True); "
            "print(len(rows), 'timm' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    n, timm, torch = out.stdout.split()
    assert int(n) > 10 and timm == "False" and torch == "False", out.stderr
