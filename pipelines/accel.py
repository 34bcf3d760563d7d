"""CUDA speed switches (issue 14): channels-last memory format where it pays, `torch.compile` on request, and the
DataLoader's worker processes and pinned memory. Each returns one-line notes for the user: what was turned on,
or why not.

- `channels_last_pays(arch)` / `model_pays(model)`: whether an architecture convolves beyond the layers that read
  the image (`MIN_BODY_CONVS` Conv2d layers over feature maps), decided from the model's modules, not from its
  name. A FLOP share of Conv2d against Linear does not work: timm's ConvNeXt computes its pointwise convolutions
  as Linear layers over a permuted NHWC view (Conv2d is ~4% of its FLOPs, a ViT's patch embedding ~1.4%), yet
  channels-last is what makes those permutes free. Counted on the networks themselves: ResNet/ResNeXt/RegNet/
  EfficientNet/MobileNet/DenseNet/VGG/ConvNeXt and the conv-attention hybrids (CoAtNet, MaxViT, MobileViT,
  EfficientFormer, PVTv2, XCiT) have 9 to 300+ such layers, timm's tiny `test_*` nets 12 to 16; ViT, DeiT, BEiT,
  EVA, CaiT, Swin (v1, v2), Hiera, MLP-Mixer and gMLP have none, PiT, NesT, LeViT, Sequencer and VOLO 2 to 4
  (their conv stems or pooling). An architecture that cannot be built counts as not paying: nothing changes.
- `accelerate(learn, member, device)`: on CUDA, fastai's `ChannelsLast` callback where it pays and the card
  computes the run's precision on Tensor Cores; `torch.compile` of the model with `member.compile`, in place
  (`nn.Module.compile`: the state dict keeps its keys, so checkpoints, kept weights and `load_state_dict` are
  unchanged). On the CPU nothing changes (torch's inductor took 137 s to compile `test_resnet` on this project's
  2-core test machine, and then trained slower than eager).
- `loader_options(member, device)`: `num_workers` and `pin_memory` for fastai's DataLoaders, and a note where
  fastai itself turns the workers off (macOS; Windows inside a notebook).

torch and fastai are imported inside functions only: importing this module costs nothing.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from functools import lru_cache
from pathlib import Path

# Conv2d layers over feature maps (not reading the image) from which a network counts as convolutional. Attention
# networks have 0 to 4 (a conv stem, conv pooling), the smallest convolutional ones 9 (VGG-11) and more.
MIN_BODY_CONVS = 8
IMAGE_CHANNELS = 3  # ens's images are RGB: a Conv2d with 3 input channels reads the image (a stem, a patch embedding)
# the default worker count is the cores available, up to this: more workers rarely feed one GPU faster, and each
# holds its own prefetched batches (host and shared memory)
MAX_WORKERS = 8
# torch.compile's recompilations per compiled code before it falls back to eager, silently but for a log line
# (torch's default is 8). Every model compiled in one process shares that code and so the limit (the third
# member of an ensemble hit it in a test here), and one member's graphs (training and validation, frozen and
# unfrozen, static then dynamic shapes) come near 8 already: `accelerate` clears torch's compile cache for each
# model it compiles and raises the limit to this.
RECOMPILE_LIMIT = 64


# --------------------------------------------------------------------------------------------- channels-last
def body_convs(model) -> int:
    """The Conv2d layers of `model` that convolve feature maps: those not reading the image itself."""
    from torch import nn

    return sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels != IMAGE_CHANNELS)


def model_pays(model) -> bool:
    """Whether channels-last pays for `model` on CUDA: it convolves beyond its input layers (`MIN_BODY_CONVS`)."""
    return body_convs(model) >= MIN_BODY_CONVS


def _bare_model(arch: str):
    """The network of `arch` without a fastai head (its body decides), on torch's meta device where the builder
    allows it (no memory, no initialisation: a ViT-L takes well under a second), else on the CPU; random weights,
    nothing downloaded."""
    import torch

    from . import nets
    from .models import split_arch

    kind, name = split_arch(arch)

    def build():
        with warnings.catch_warnings():  # deprecated timm aliases, torch.jit chatter
            warnings.simplefilter("ignore")
            if kind == "ens":
                return nets.build(name, 2)
            if kind == "torchvision":
                import torchvision

                return torchvision.models.get_model(name, weights=None)
            if kind == "fastai":
                from fastai.vision.models import xresnet

                return getattr(xresnet, name)()
            import timm

            try:
                return timm.create_model(name, pretrained=False)
            except Exception:
                # a hub name ('hf-hub:timm/convnext_tiny.fb_in1k') needs its config from the hub: timm's own name
                bare = name.rsplit("/", 1)[-1].split(":")[-1]
                if bare == name:
                    raise
                return timm.create_model(bare, pretrained=False)

    try:
        with torch.device("meta"):
            return build()
    except Exception:  # a builder that computes with tensors while building (torchvision's RegNets)
        return build()


@lru_cache(maxsize=None)
def channels_last_pays(arch: str) -> bool:
    """Whether channels-last memory format speeds `arch` up on CUDA (`model_pays` of its network, built once per
    process on the meta device). False for an architecture that cannot be built: then nothing changes."""
    try:
        return model_pays(_bare_model(arch))
    except Exception:
        return False


def tensor_cores(precision: str, capability: tuple[int, int] | None, tf32: bool = True) -> bool:
    """Whether cuDNN computes `precision` on Tensor Cores, where its channels-last kernels are the fast ones:
    fp16/bf16 from compute capability 7.0 (V100, T4, RTX 20xx), fp32 as TF32 from 8.0 (A100, RTX 30xx) when
    torch lets cuDNN use TF32 (its default). Pascal cards (P100) have none. An unknown capability counts as yes."""
    if capability is None:
        return True
    if precision in ("fp16", "bf16"):
        return tuple(capability) >= (7, 0)
    return tf32 and tuple(capability) >= (8, 0)


def _learner_precision(learn, member) -> str:
    """The precision `learn` trains with: its MixedPrecision callback's ('fp16'/'bf16'), else what the member
    asks ('auto' is mixed precision on CUDA: `train.resolve_precision`)."""
    mixed = getattr(learn, "mixed_precision", None)
    if mixed is not None:
        mode = str(getattr(mixed, "amp_mode", "fp16")).lower()
        return "bf16" if "bf16" in mode else "fp16"
    return "fp16" if member.precision == "auto" else member.precision


def _capability(cuda) -> tuple[int, int] | None:
    if cuda is None:
        import torch

        cuda = torch.cuda
    try:
        return tuple(cuda.get_device_capability())
    except Exception:  # no driver (tests on the CPU)
        return None


def channels_last_model(model, device: str, precision: str = "fp16", cuda=None):
    """`model` converted to channels-last in place where it pays (`model_pays`, `tensor_cores`) on CUDA, and
    returned: for a network used outside a Learner, such as the memory probe's (`memory.plan_member`), so that
    it measures the layout training uses."""
    import torch

    if device == "cuda" and model_pays(model) and tensor_cores(precision, _capability(cuda),
                                                               torch.backends.cudnn.allow_tf32):
        model.to(memory_format=torch.channels_last)
    return model


# --------------------------------------------------------------------------------------------- the learner
def accelerate(learn, member, device: str, *, precision: str | None = None, compile_model: bool | None = None,
               backend: str = "inductor", cuda=None) -> list[str]:
    """The CUDA speed switches on a freshly built fastai Learner (before it fits); one-line notes for the user.

    On CUDA:
    - channels-last where the network convolves (`model_pays`) and the card runs `precision` (default: the
      learner's MixedPrecision callback, else the member's) on Tensor Cores (`tensor_cores`): fastai's
      `ChannelsLast` callback, which converts the model at the start of every fit and prediction (it leaves the
      inputs alone: a convolution with channels-last weights runs channels-last). The model is converted at
      once as well. Not `Learner.to_channelslast()`, which also adds fp16 MixedPrecision by default: the
      precision stays as ens chose it (`to_fp16`/`to_bf16`, before or after this call).
    - `torch.compile` with `compile_model` (default `member.compile`), in place (`nn.Module.compile`): the state
      dict keeps its keys (no `_orig_mod.` prefix), so checkpoints and kept weights save and load as before.
      torch's compile cache is cleared first and its recompile limit raised (`RECOMPILE_LIMIT`). Skipped, with
      a note, where torch.compile cannot run (no Triton for inductor). `backend` is for tests ('eager' runs
      anywhere).
    On the CPU nothing changes; `member.compile` gets a note that it is used on CUDA only.
    `cuda` (default torch.cuda) is injectable, for the compute capability."""
    import torch

    compile_model = member.compile if compile_model is None else compile_model
    if device != "cuda":
        return ([f"compile: {member.name} trains on the CPU, where ens does not use torch.compile (on CUDA only: "
                 "compiling takes minutes on a CPU and trains no faster)"] if compile_model else [])
    notes = []
    convs = body_convs(learn.model)
    precision = precision or _learner_precision(learn, member)
    capability = _capability(cuda)
    if convs < MIN_BODY_CONVS:
        notes.append(f"channels-last: off for {member.arch} ({convs} convolutions past its input layers, fewer than "
                     f"{MIN_BODY_CONVS}: attention networks gain nothing from it, convolutional ones do)")
    elif not tensor_cores(precision, capability, torch.backends.cudnn.allow_tf32):
        cc = ".".join(map(str, capability))
        why = ("needs compute capability 8.0 for TF32" if precision == "fp32" else "needs compute capability 7.0")
        notes.append(f"channels-last: off (no Tensor Cores for {precision} on this card, compute capability {cc}: "
                     f"its channels-last kernels are no faster; it {why})")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.cuda.amp deprecations in fastai's imports
            from fastai.callback.channelslast import ChannelsLast
        learn.model.to(memory_format=torch.channels_last)
        if not any(isinstance(cb, ChannelsLast) for cb in learn.cbs):
            learn.add_cb(ChannelsLast())
        notes.append(f"channels-last: on ({member.arch} convolves: {convs} convolutions; cuDNN's NHWC kernels on "
                     f"Tensor Cores, {precision})")
    if compile_model:
        notes.append(_compile(learn.model, backend))
    return notes


def _compile(model, backend: str) -> str:
    """Compile `model` in place; the note for the user."""
    import torch

    if not torch._dynamo.is_dynamo_supported():
        return f"compile: off (torch.compile is not supported on this Python/platform: Python {sys.version.split()[0]})"
    if backend == "inductor":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "compile: off (torch.compile's inductor needs Triton for CUDA, not installed: pip install triton)"
    torch._dynamo.reset()  # graphs of earlier models share the limit: `RECOMPILE_LIMIT`
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # torch ≥ 2.6 names it recompile_limit
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
    model.compile(backend=backend)
    return (f"compile: on (torch.compile, {backend}); the first batches are slow, and again after each change it "
            "compiles for: a new stage size or a smaller last batch (from the second size on, one graph serves every "
            "size), validation after training, unfreezing")


# --------------------------------------------------------------------------------------------- DataLoaders
def available_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The cores this process may run on: its CPU affinity (`os.sched_getaffinity`, where the OS has it; else
    `os.cpu_count()`), lowered to a container's CPU quota (cgroup v2 `cpu.max`, v1 `cpu/cpu.cfs_quota_us`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota(cgroup)
    return max(1, min(cores, quota) if quota else cores)


def _cgroup_quota(root: Path) -> int | None:
    """A CPU quota in whole cores (rounded up), or None for none or unreadable."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return math.ceil(int(text[0]) / int(text[1]))
        if text:
            return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return math.ceil(quota / period) if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def fastai_main_process() -> str | None:
    """Why fastai loads data in the main process here whatever num_workers says, or None when it does not.
    Asked of fastai itself (its DataLoader sets num_workers to 0 on macOS and on Windows inside a notebook:
    `fastai.data.load.DataLoader.__init__`), so a fastai that changes the rule is followed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastai.data.load import DataLoader

    if DataLoader(dataset=[0], bs=1, num_workers=1).fake_l.num_workers > 0:
        return None
    if sys.platform == "darwin":
        return "on macOS fastai's DataLoader always does"
    if sys.platform == "win32":
        return "on Windows inside a notebook fastai's DataLoader always does; run ens from a terminal for workers"
    return f"fastai's DataLoader does on {sys.platform}"


def loader_options(member, device: str) -> tuple[dict, list[str]]:
    """({'num_workers': n, 'pin_memory': bool}, notes) for the member's fastai DataLoaders on `device`.

    num_workers: the member's, else the cores available (`available_cores`, at most `MAX_WORKERS`); 0 where
    fastai forces the main process (`fastai_main_process`), with a note saying what that costs. pin_memory on
    CUDA (page-locked batches copy to the card faster; fastai's DataLoader passes it to torch's workers)."""
    notes = []
    cores = available_cores()
    # a decoded copy's batches are gathered in a memory copy: a worker would only add the copy of each batch through
    # shared memory (measured: 4.0k images/s in the main process, 1.4k with 2 workers at 224 px)
    default = 0 if getattr(member, "decode", False) else min(MAX_WORKERS, cores)
    workers = member.num_workers if member.num_workers is not None else default
    reason = fastai_main_process() if workers > 0 else None
    if reason:
        waiting = "the GPU" if device == "cuda" else "training"
        remedy = "" if member.decode else "; decode: true (batches read whole from a decoded copy) cuts that cost"
        notes.append(f"fastai loads in the main process here ({reason}): num_workers {workers} is ignored, images "
                     f"are decoded and augmented between steps and {waiting} waits for them{remedy}")
        workers = 0
    elif member.num_workers is not None and member.num_workers > cores:
        notes.append(f"num_workers {member.num_workers} is more than the {cores} cores this process may use: the "
                     "workers take turns")
    return {"num_workers": workers, "pin_memory": device == "cuda"}, notes
