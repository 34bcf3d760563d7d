"""Architecture names → models: timm names (deprecated aliases such as `convnext_small_in22k` included),
torchvision names as `torchvision:NAME`, fastai's own as `fastai:NAME`.

The list of known names is memoised per library version in ~/.cache/ens/, so checking a config does not pay timm's
import (seconds); the learner itself is built only where training happens.
"""

from __future__ import annotations

import difflib
import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .errors import ConfigError

PREFIXES = ("timm", "torchvision", "fastai")


def split_arch(arch: str) -> tuple[str, str]:
    """('timm' | 'torchvision' | 'fastai', name); plain names are timm's."""
    kind, sep, name = arch.partition(":")
    return (kind, name) if sep and kind in PREFIXES else ("timm", arch)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _list_architectures() -> dict[str, list[str]]:
    import warnings

    with warnings.catch_warnings():  # import-time deprecation chatter from torch.jit
        warnings.simplefilter("ignore")
        import timm
        import torchvision.models
        from fastai.vision.models import xresnet

    timm_names = set(timm.list_models()) | set(timm.list_models(pretrained=True))
    timm_names |= set(timm.models.get_deprecated_models())
    return {
        "timm": sorted(timm_names),
        "torchvision": sorted(torchvision.models.list_models(module=torchvision.models)),
        "fastai": sorted(n for n in xresnet.__all__ if n.startswith(("xresnet", "xse_", "xsenet"))),
    }


def user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ens"


def known_architectures() -> dict[str, list[str]]:
    """Every nameable architecture, by library; memoised per library versions in ~/.cache/ens/ (it depends on the
    installed libraries, not on the project)."""
    memo = user_cache() / f"archs-timm{_version('timm')}-tv{_version('torchvision')}-fastai{_version('fastai')}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    names = _list_architectures()
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(names))
    os.replace(tmp, memo)
    return names


def check_arch(arch: str, where: str) -> None:
    """Raise a one-line ConfigError naming close matches when `arch` is not a known name."""
    kind, name = split_arch(arch)
    known = known_architectures()[kind]
    if name in known:
        return
    base = name.split(".")[0]  # timm pretrained tags: 'convnext_small.fb_in22k'
    if kind == "timm" and base in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    prefix = "" if kind == "timm" else f"{kind}:"
    hint = f"did you mean {', '.join(prefix + c for c in close)}?" if close else \
        "`python -c \"import timm; print(timm.list_models('convnext*'))\"` lists timm's names"
    raise ConfigError(f"{where}: unknown {kind} architecture '{name}'; {hint}")


def with_size_kwargs(create, final_size):
    """`create(**size kwargs)`: ViT-style models are built for one input size, so they get the member's, and may
    take other sizes (progressive resizing) and sizes that are not a multiple of the patch (the seed's ViT at
    244 px) by resampling the position embedding and padding the input. Constructors that reject these
    arguments (convolutional nets take any size) are called again without them."""
    kwargs = {"img_size": final_size if isinstance(final_size, int) else tuple(final_size),
              "dynamic_img_size": True, "dynamic_img_pad": True}
    while True:
        try:
            return create(**kwargs)
        except TypeError as e:
            rejected = [k for k in kwargs if f"'{k}'" in str(e)]
            if not rejected:
                raise
            del kwargs[rejected[0]]


def _vision_builder(kind: str, name: str):
    """The constructor of a torchvision or fastai architecture (fastai cuts and heads it)."""
    if kind == "torchvision":
        import torchvision.models

        return torchvision.models.get_model_builder(name)
    from fastai.vision.models import xresnet

    return getattr(xresnet, name)


def build_model(arch: str, n_classes: int, final_size):
    """The network `build_learner` trains for `arch` (the same fastai body and head, the same size arguments),
    without DataLoaders or a Learner and with random weights: nothing is downloaded. For memory probes and FLOP
    counts, where weights do not matter."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastai.vision.learner import create_timm_model, create_vision_model

    kind, name = split_arch(arch)
    if kind == "timm":
        return with_size_kwargs(lambda **kw: create_timm_model(name, n_classes, pretrained=False, **kw)[0], final_size)
    return create_vision_model(_vision_builder(kind, name), n_classes, pretrained=False)


def timm_weights_kwargs(pretrained) -> dict:
    """`pretrained: path/to/weights` loads a local file through timm's own pretrained machinery."""
    if isinstance(pretrained, str):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise ConfigError(f"pretrained: weights file {pretrained} does not exist; give an existing file, true or false")
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path.resolve())}}
    return {"pretrained": bool(pretrained)}


def build_learner(dls, member, metrics, cbs=()):
    """A fastai Learner for `member` on `dls`, and the (mean, std) its inputs must be normalised with:
    the pretrained weights' own statistics, or ImageNet's for from-scratch bodies (fastai adds none then)."""
    from fastai.vision.all import imagenet_stats, vision_learner

    kind, name = split_arch(member.arch)
    common = dict(normalize=False, metrics=metrics, cbs=list(cbs))
    if kind == "timm":
        weights = timm_weights_kwargs(member.pretrained)
        learn = with_size_kwargs(lambda **kw: vision_learner(dls, name, **common, **weights, **kw), member.final_size)
        cfg = learn.model[0].model.pretrained_cfg
        stats = (cfg["mean"], cfg["std"]) if weights["pretrained"] and "mean" in cfg else imagenet_stats
        return learn, stats
    if isinstance(member.pretrained, str):
        raise ConfigError(f"member {member.name}: weights files are supported for timm architectures; "
                          f"use timm's name for {name} or pretrained: true/false")
    arch = _vision_builder(kind, name)
    learn = vision_learner(dls, arch, pretrained=bool(member.pretrained), **common)
    return learn, imagenet_stats
