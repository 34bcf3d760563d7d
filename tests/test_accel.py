"""The CUDA speed switches (`pipelines/accel.py`), tested on a CPU-only machine: `accelerate(..., device="cuda")`
on real fastai learners (models.build_learner, timm's tiny nets at 32 px) whose models stay on the CPU, so that
channels-last, the callbacks and the precision can be checked and a fit still runs; torch.compile with the
'eager' backend (inductor needs Triton, i.e. CUDA); the DataLoader options on simulated platforms."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO
from pipelines import accel
from pipelines.accel import (MIN_BODY_CONVS, RECOMPILE_LIMIT, accelerate, available_cores, body_convs,
                             channels_last_pays, loader_options, model_pays, tensor_cores)
from pipelines.config import Member

CL = torch.channels_last


def member(arch="test_resnet", **fields):
    return Member(**({"name": "m", "arch": arch, "pretrained": False, "size": 32, "epochs": 1, "lr": 0.005,
                      "batch_size": 16} | fields))


def tiny_dls(n=48, size=32):
    """fastai DataLoaders of random 32 px images in 10 classes (fastai's own DataLoaders and tensor types)."""
    from fastai.vision.all import CrossEntropyLossFlat, DataLoaders, TensorCategory, TensorImage

    class Items(list):
        loss_func, c = CrossEntropyLossFlat(), 10

    g = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)
    items = [(TensorImage(x), TensorCategory(y)) for x, y in zip(xs, ys)]
    cut = n * 3 // 4
    return DataLoaders.from_dsets(Items(items[:cut]), Items(items[cut:]), bs=16, num_workers=0, device="cpu")


def learner(arch="test_resnet", **fields):
    from fastai.vision.all import accuracy, noop

    from pipelines.models import build_learner

    torch.manual_seed(0)
    learn, _ = build_learner(tiny_dls(), member(arch, **fields), metrics=[accuracy])
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = noop
    return learn


def convs(model):
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels != 3]


def all_channels_last(model) -> bool:
    ws = convs(model)
    return bool(ws) and all(w.is_contiguous(memory_format=CL) for w in ws)


def any_channels_last(model) -> bool:
    return any(p.dim() == 4 and p.is_contiguous(memory_format=CL) and not p.is_contiguous() for p in model.parameters())


def cb_names(learn):
    return [type(cb).__name__ for cb in learn.cbs]


@pytest.fixture
def dynamo():
    """torch.compile's process-wide state put back after the test."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    old = getattr(config, name)
    yield name
    torch._dynamo.reset()
    setattr(config, name, old)


# --------------------------------------------------------------------------------------------- which archs pay
@pytest.mark.parametrize("arch,pays", [
    ("test_resnet", True), ("test_convnext", True), ("test_efficientnet", True),
    ("resnet18", True), ("convnext_small_in22k", True), ("timm/convnext_tiny.fb_in1k", True),
    ("efficientnet_b0", True), ("mobilenetv3_large_100", True), ("densenet121", True),
    ("torchvision:regnet_y_400mf", True),  # a builder that fails on the meta device: built on the CPU
    ("test_vit", False), ("vit_small_patch16_224", False), ("deit_small_patch16_224", False),
    ("beit_base_patch16_224", False), ("swin_tiny_patch4_window7_224", False), ("torchvision:vit_b_16", False),
    ("hf-hub:timm/vit_small_patch16_224.augreg_in21k", False),  # offline: timm's own name decides
    ("hf-hub:timm/convnext_tiny.fb_in1k", True),
    ("no_such_model_anywhere", False),  # cannot be built: nothing changes
])
def test_channels_last_pays_for_convolutional_networks_only(arch, pays):
    assert channels_last_pays(arch) is pays


def test_the_rule_counts_convolutions_over_feature_maps():
    import timm

    with torch.device("meta"):
        vit, resnet = timm.create_model("test_vit"), timm.create_model("test_resnet")
    assert body_convs(vit) == 0 and not model_pays(vit)  # its one conv is the patch embedding: reads the image
    assert body_convs(resnet) >= MIN_BODY_CONVS and model_pays(resnet)


def test_channels_last_pays_is_memoised(monkeypatch):
    channels_last_pays("test_convnext")
    monkeypatch.setattr(accel, "_bare_model", lambda arch: pytest.fail("rebuilt"))
    assert channels_last_pays("test_convnext") is True


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit"])
def test_the_learner_and_the_arch_agree(arch):
    assert model_pays(learner(arch).model) is channels_last_pays(arch)  # fastai's head adds no conv


def test_tensor_cores():
    assert tensor_cores("fp16", (7, 5)) and tensor_cores("bf16", (8, 0)) and tensor_cores("fp32", (8, 6))
    assert not tensor_cores("fp16", (6, 0))  # P100
    assert not tensor_cores("fp32", (7, 5))  # T4 in fp32: no TF32
    assert not tensor_cores("fp32", (8, 0), tf32=False)
    assert tensor_cores("fp16", None)  # unknown: assume a current card


# --------------------------------------------------------------------------------------------- channels-last
def test_a_convnet_goes_channels_last_on_cuda_and_still_fits():
    learn = learner("test_resnet")
    assert not any_channels_last(learn.model)
    notes = accelerate(learn, member("test_resnet"), "cuda")
    assert all_channels_last(learn.model)
    assert "ChannelsLast" in cb_names(learn)
    assert any(n.startswith("channels-last: on") for n in notes), notes
    learn.model.to(memory_format=torch.contiguous_format)  # fastai's callback converts again at every fit
    learn.fit(1, 1e-3)
    assert all_channels_last(learn.model)
    assert learn.recorder.values and all(v == v for v in learn.recorder.values[-1])  # losses, not NaN
    before = [p.detach().clone() for p in learn.model.parameters()]
    learn.fit(1, 1e-3)
    assert any(not torch.equal(a, p) for a, p in zip(before, learn.model.parameters()))  # it trains
    learn.model.to(memory_format=torch.contiguous_format)
    learn.get_preds()  # prediction converts too (fastai's callbacks see before_fit there)
    assert all_channels_last(learn.model)


def test_an_attention_network_stays_as_it_is():
    learn = learner("test_vit")
    notes = accelerate(learn, member("test_vit"), "cuda")
    assert not any_channels_last(learn.model)
    assert "ChannelsLast" not in cb_names(learn)
    assert any(n.startswith("channels-last: off for test_vit (0 convolutions") for n in notes), notes


def test_accelerate_twice_adds_one_callback():
    learn = learner()
    accelerate(learn, member(), "cuda")
    accelerate(learn, member(), "cuda")
    assert cb_names(learn).count("ChannelsLast") == 1


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("before", [True, False])
def test_the_precision_ens_chose_is_kept(precision, before):
    from fastai.callback.fp16 import AMPMode

    learn = learner()
    set_precision = learn.to_fp16 if precision == "fp16" else learn.to_bf16
    if before:
        set_precision()
    accelerate(learn, member(precision=precision), "cuda")
    if not before:
        set_precision()
    assert all_channels_last(learn.model)
    assert cb_names(learn).count("MixedPrecision") == 1
    assert learn.mixed_precision.amp_mode == AMPMode(precision)


def test_fp32_adds_no_mixed_precision():
    learn = learner()
    accelerate(learn, member(precision="fp32"), "cuda", cuda=SimpleNamespace(get_device_capability=lambda: (8, 0)))
    assert all_channels_last(learn.model)
    assert "MixedPrecision" not in cb_names(learn) and not hasattr(learn, "mixed_precision")


@pytest.mark.parametrize("capability,precision,on", [((6, 0), "fp16", False), ((7, 5), "fp16", True),
                                                     ((7, 5), "fp32", False), ((8, 0), "fp32", True)])
def test_channels_last_needs_tensor_cores(capability, precision, on):
    learn = learner()
    notes = accelerate(learn, member(precision=precision), "cuda",
                       cuda=SimpleNamespace(get_device_capability=lambda: capability))
    assert all_channels_last(learn.model) is on
    assert ("ChannelsLast" in cb_names(learn)) is on
    if not on:
        assert any("no Tensor Cores" in n and f"{capability[0]}.{capability[1]}" in n for n in notes), notes


def test_the_precision_is_read_from_the_learner():
    learn = learner()
    learn.to_fp16()  # the member says fp32 but the learner trains in fp16: Tensor Cores from 7.0
    accelerate(learn, member(precision="fp32"), "cuda", cuda=SimpleNamespace(get_device_capability=lambda: (7, 0)))
    assert all_channels_last(learn.model)


def test_nothing_changes_on_the_cpu():
    learn = learner()
    cbs = cb_names(learn)
    assert accelerate(learn, member(), "cpu") == []
    assert not any_channels_last(learn.model) and cb_names(learn) == cbs
    notes = accelerate(learn, member(compile=True), "cpu")
    assert len(notes) == 1 and "CUDA only" in notes[0]
    assert learn.model._compiled_call_impl is None


# --------------------------------------------------------------------------------------------- checkpoints
def test_channels_last_weights_save_and_load_both_ways(tmp_path):
    learn = learner()
    accelerate(learn, member(), "cuda")
    learn.fit(1, 1e-3)
    path = tmp_path / "model.pth"
    torch.save(learn.model.state_dict(), path)
    fresh = learner().model
    fresh.load_state_dict(torch.load(path, map_location="cpu"))  # kept weights into a plain model
    x = torch.rand(4, 3, 32, 32)
    learn.model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(learn.model(x), fresh(x), atol=1e-5)
    other = learner()
    accelerate(other, member(), "cuda")
    other.model.load_state_dict(fresh.state_dict())  # a resume: plain weights into a channels-last model
    assert all_channels_last(other.model)
    other.model.eval()
    with torch.no_grad():
        assert torch.allclose(other.model(x), fresh(x), atol=1e-5)


# --------------------------------------------------------------------------------------------- torch.compile
@pytest.mark.slow
def test_compile_in_place_keeps_the_state_dict(dynamo):
    import torch._dynamo

    learn = learner()
    keys = list(learn.model.state_dict())
    notes = accelerate(learn, member(compile=True), "cuda", backend="eager")
    assert learn.model._compiled_call_impl is not None
    assert any(n.startswith("compile: on") and "first batches are slow" in n and "stage size" in n
               for n in notes), notes
    assert getattr(torch._dynamo.config, dynamo) >= RECOMPILE_LIMIT
    learn.fit(1, 1e-3)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the fit went through torch.compile
    state = learn.model.state_dict()
    assert list(state) == keys  # no `_orig_mod.` prefix: checkpoints and kept weights as before
    fresh = learner().model
    fresh.load_state_dict(state)
    learn.model.load_state_dict(fresh.state_dict())
    x = torch.rand(2, 3, 32, 32)
    learn.model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.allclose(learn.model(x), fresh(x), atol=1e-5)


def test_compile_only_when_asked(dynamo):
    learn = learner()
    notes = accelerate(learn, member(), "cuda", backend="eager")
    assert learn.model._compiled_call_impl is None and not any(n.startswith("compile") for n in notes)
    learn = learner()
    accelerate(learn, member(compile=True), "cuda", backend="eager", compile_model=False)  # e.g. prediction
    assert learn.model._compiled_call_impl is None


def test_inductor_without_triton_is_skipped_with_a_note(dynamo):
    from torch.utils._triton import has_triton

    if has_triton():
        pytest.skip("Triton is installed here")
    learn = learner()
    notes = accelerate(learn, member(compile=True), "cuda")
    assert learn.model._compiled_call_impl is None
    assert any(n.startswith("compile: off") and "Triton" in n for n in notes), notes


# --------------------------------------------------------------------------------------------- DataLoaders
def test_default_workers_are_the_cores_this_process_may_use():
    cores = len(os.sched_getaffinity(0))
    options, notes = loader_options(member(), "cpu")
    assert options == {"num_workers": min(cores, accel.MAX_WORKERS), "pin_memory": False} and notes == []
    assert loader_options(member(num_workers=1), "cuda") == ({"num_workers": 1, "pin_memory": True}, [])


def test_more_workers_than_cores_is_said():
    options, notes = loader_options(member(num_workers=available_cores() + 3), "cuda")
    assert options["num_workers"] == available_cores() + 3
    assert len(notes) == 1 and "more than" in notes[0]


def test_affinity_decides_the_default(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(accel, "_cgroup_quota", lambda root: None)
    assert loader_options(member(), "cuda")[0]["num_workers"] == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert loader_options(member(), "cuda")[0]["num_workers"] == accel.MAX_WORKERS


def test_a_container_quota_lowers_the_cores(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")
    assert available_cores(v2) == 3  # 2.5 cores: rounded up
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cores(v2) == 16
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(v1) == 4
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cores(v1) == 16
    assert available_cores(tmp_path / "none") == 16


def test_fastai_loads_in_the_main_process_on_macos(monkeypatch):
    from fastai.data.load import DataLoader

    monkeypatch.setattr(sys, "platform", "darwin")
    options, notes = loader_options(member(num_workers=4), "cuda")
    assert options["num_workers"] == 0
    assert len(notes) == 1 and notes[0].startswith("fastai loads in the main process here") and "macOS" in notes[0]
    assert "decode: true" in notes[0]
    assert DataLoader(dataset=[0], bs=1, num_workers=4).fake_l.num_workers == 0  # what the note says: fastai's rule
    assert loader_options(member(num_workers=0), "cuda") == ({"num_workers": 0, "pin_memory": True}, [])
    assert "decode: true" not in loader_options(member(num_workers=4, decode=True), "cpu")[1][0]


def test_fastai_loads_in_the_main_process_in_a_windows_notebook(monkeypatch):
    import fastai.data.load

    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(fastai.data.load, "IN_NOTEBOOK", False)
    assert loader_options(member(num_workers=2), "cuda") == ({"num_workers": 2, "pin_memory": True}, [])
    monkeypatch.setattr(fastai.data.load, "IN_NOTEBOOK", True)
    options, notes = loader_options(member(num_workers=2), "cuda")
    assert options["num_workers"] == 0 and "Windows inside a notebook" in notes[0]


def test_on_linux_fastai_keeps_the_workers():
    assert sys.platform.startswith("linux")
    assert accel.fastai_main_process() is None


def test_importing_the_module_is_cheap():
    code = "import sys, pipelines.accel; print(sorted(m for m in ('torch', 'fastai', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_decoded_copy_loads_in_the_main_process_by_default():
    """Its batches are one memory copy: workers would only copy each batch again through shared memory."""
    assert loader_options(member(decode=True), "cuda")[0]["num_workers"] == 0
    assert loader_options(member(decode=True, num_workers=2), "cuda")[0]["num_workers"] == 2
