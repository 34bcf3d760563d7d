"""Architecture names → models: timm names (deprecated aliases such as `convnext_small_in22k` included),
torchvision names as `torchvision:NAME`, fastai's own as `fastai:NAME`, and this project's from-scratch nets
(`nets.py`: the seeds' LeNet-5, AlexNet-with-one-batch-norm and CIFAR CNN) as `ens:NAME`.

Naming rule: a prefix (`timm:`, `torchvision:`, `fastai:`, `ens:`) says which library; a plain name is timm's,
unless timm has no model of that name and `nets.py` has one, then it is ens's (`lenet5` = `ens:lenet5`). timm
wins a clash, so a timm name never changes meaning; `ens:` always means ens's own. The `ens:` nets have no
pretrained weights: they need `pretrained: false` (a one-line ConfigError otherwise), are trained with
`fit_one_cycle` like any from-scratch body, and their inputs are normalised with ImageNet's statistics.

The list of known names is memoised per library version in ~/.cache/ens/, so checking a config does not pay timm's
import (seconds); the learner itself is built only where training happens. `list_models` (`ens models`) reads
the same memo.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import json
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import nets
from .config import is_classical
from .errors import ConfigError, EnsError
from .util import user_cache, write_json

PREFIXES = ("timm", "torchvision", "fastai", "ens")


def split_arch(arch: str) -> tuple[str, str]:
    """('timm' | 'torchvision' | 'fastai' | 'ens', name); plain names are timm's, but for a name only `nets.py`
    knows (timm's memoised list is read for those names only)."""
    kind, sep, name = arch.partition(":")
    if sep and kind in PREFIXES:
        return kind, name
    if arch in nets.NETS and not _timm_knows(arch):
        return "ens", arch
    return "timm", arch


def _timm_knows(name: str) -> bool:
    known = known_architectures()["timm"]
    return name in known or name.split(".")[0] in known


@functools.lru_cache(maxsize=None)
def package_version(package: str) -> str:
    """The installed version of `package`, or 'none' (for memo file names: a new version makes a new memo); asked
    once per process (each metadata look-up scans site-packages: version checks of 8 cached members cost 0.2 s)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def _list_architectures() -> dict:
    import warnings

    with warnings.catch_warnings():  # import-time deprecation chatter from torch.jit
        warnings.simplefilter("ignore")
        import timm
        import torchvision.models
        from fastai.vision.models import xresnet

    from timm.models import get_pretrained_cfg
    from timm.models._registry import _model_default_cfgs

    deprecated = dict(timm.models.get_deprecated_models())
    tagged = timm.list_models(pretrained=True)
    timm_names = set(timm.list_models()) | set(tagged) | set(deprecated)
    hubs = {}
    for name in tagged:  # where `pretrained: true` fetches the weights from: a changed source is other weights
        cfg = get_pretrained_cfg(name)
        hubs[name] = (cfg.hf_hub_id or cfg.url or "") if cfg is not None else ""
    return {
        "timm": sorted(timm_names),  # architectures, their pretrained tags ('convnext_small.fb_in22k'), aliases
        "timm_deprecated": deprecated,  # alias → current name (with its tag)
        "timm_default_tag": {a: c.tags[0] for a, c in _model_default_cfgs.items() if c.tags and c.tags[0]},
        "timm_hub": hubs,
        "torchvision": sorted(torchvision.models.list_models(module=torchvision.models)),
        "torchvision_weights": _torchvision_weights(torchvision.models),
        "torchvision_urls": _torchvision_urls(torchvision.models),
        "fastai": sorted(n for n in xresnet.__all__ if n.startswith(("xresnet", "xse_", "xsenet"))),
    }


def _torchvision_weights(tvm) -> dict:
    """name → the weights fastai's `pretrained=True` loads for a torchvision architecture: torchvision's DEFAULT
    (which moves between torchvision versions, e.g. resnet50's V1 → V2) where fastai asks for it, else the
    builder's legacy `pretrained=True` weights."""
    from fastai.vision.learner import _default_meta, model_meta

    out = {}
    for name in tvm.list_models(module=tvm):
        if model_meta.get(tvm.get_model_builder(name), _default_meta).get("weights") != "DEFAULT":
            out[name] = "legacy pretrained=True"
            continue
        try:
            out[name] = str(tvm.get_model_weights(name).DEFAULT)
        except (ValueError, KeyError, AttributeError):
            out[name] = "none"
    return out


def _torchvision_urls(tvm) -> dict:
    """name → the URL of the DEFAULT weights fastai loads for a torchvision architecture (where it names them),
    for telling whether they are in torch hub's cache."""
    out = {}
    for name, weights in _torchvision_weights(tvm).items():
        if weights.startswith(("legacy", "none")):
            continue
        try:
            out[name] = tvm.get_model_weights(name).DEFAULT.url
        except (ValueError, KeyError, AttributeError):
            pass
    return out


@functools.lru_cache(maxsize=1)
def _memo() -> dict:
    """The libraries' names, memoised per library versions in ~/.cache/ens/ (they depend on the installed
    libraries, not on the project), read once per process. Callers must not change the dict."""
    versions = f"timm{package_version('timm')}-tv{package_version('torchvision')}-fastai{package_version('fastai')}"
    memo = user_cache() / f"archs4-{versions}.json"
    try:
        names = json.loads(memo.read_text())
        if isinstance(names, dict) and all(k in names for k in MEMO_KEYS):
            return names
    except (OSError, ValueError):
        pass
    names = _list_architectures()
    write_json(memo, names)
    return names


MEMO_KEYS = ("timm", "timm_deprecated", "timm_default_tag", "timm_hub", "torchvision", "torchvision_weights",
             "torchvision_urls", "fastai")


def resolved_arch(arch: str, pretrained) -> str:
    """The architecture as the cache key holds it: a timm alias as its current name and tag
    (`convnext_small_in22k` → `convnext_small.fb_in22k`), and with `pretrained: true` an untagged timm name with
    the tag and weight source that timm resolves it to today (`convnext_small` →
    `convnext_small.in12k_ft_in1k@timm/convnext_small.in12k_ft_in1k`): timm's default tag of a name changes
    between versions, and other weights must not share a key. A torchvision name with `pretrained: true` likewise
    carries the weights fastai loads for it (`resnet50@ResNet50_Weights.IMAGENET1K_V2`)."""
    if is_classical(arch):
        return arch
    kind, name = split_arch(arch)
    if kind == "torchvision" and pretrained is True:
        return f"{arch}@{_memo()['torchvision_weights'].get(name, 'none')}"
    if kind != "timm":
        return arch
    memo = _memo()
    name = memo["timm_deprecated"].get(name) or name
    if pretrained is not True:
        return name
    if "." not in name and name in memo["timm_default_tag"]:
        name = f"{name}.{memo['timm_default_tag'][name]}"
    hub = memo["timm_hub"].get(name)
    return f"{name}@{hub}" if hub else name


HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def weights_source(arch: str, pretrained) -> str | None:
    """Where `pretrained: true` fetches `arch`'s weights from: a Hugging Face hub id (timm's `timm/NAME.TAG`) or
    a URL (older timm weights, torchvision's); None when nothing is fetched (from scratch, a weights file, ens's
    own nets, classical members) or ens cannot tell where from (fastai's, torchvision's legacy weights)."""
    if pretrained is not True or is_classical(arch):
        return None
    kind, name = split_arch(arch)
    if kind == "timm":
        resolved = resolved_arch(arch, True)
        return resolved.partition("@")[2] or None
    if kind == "torchvision":
        return _memo().get("torchvision_urls", {}).get(name)
    return None


def weights_cached(source: str) -> bool:
    """Whether the weights at `source` (`weights_source`) are in the local cache, looked up without fetching
    anything: the Hugging Face hub's cache (HF_HOME, HF_HUB_CACHE), or torch hub's checkpoints (TORCH_HOME)."""
    import os

    if source.startswith(("http://", "https://")):
        home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "torch"
        return (Path(home).expanduser() / "hub" / "checkpoints" / source.rsplit("/", 1)[-1]).is_file()
    from huggingface_hub import try_to_load_from_cache

    return any(isinstance(try_to_load_from_cache(source, f), str) for f in HF_WEIGHT_FILES)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set: the hub is not asked, what is not cached cannot be fetched."""
    import os

    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def missing_weights(members) -> list[tuple[str, str, str]]:
    """(member name, arch, source) of the members whose pretrained weights are not in the local cache."""
    out = []
    for m in members:
        source = weights_source(m.arch, m.pretrained)
        if source and not weights_cached(source):
            out.append((m.name, m.arch, source))
    return out


def weights_fixes() -> str:
    return ("set pretrained: false (train from scratch), give a weights file (pretrained: path/to/weights.pth), "
            "or connect to the network" + (" and unset HF_HUB_OFFLINE" if hub_offline() else ""))


def known_architectures() -> dict[str, list[str]]:
    """Every nameable architecture, by library ('timm', 'torchvision', 'fastai', 'ens'); the libraries' lists
    memoised (`_memo`), ens's own from `nets.py`."""
    memo = _memo()
    return {kind: memo[kind] for kind in ("timm", "torchvision", "fastai")} | {"ens": nets.names()}


def check_arch(arch: str, where: str, pretrained=None) -> None:
    """Raise a one-line ConfigError naming close matches when `arch` is not a known name; with the member's
    `pretrained`, also when it asks weights of one of ens's from-scratch nets."""
    found = arch_problem(arch, pretrained)
    if found:
        raise ConfigError(f"{where.removesuffix('.arch')}.{found[0]}: {found[1]}" if where.endswith(".arch")
                          else f"{where}: {found[1]}")


def arch_problem(arch: str, pretrained=None) -> tuple[str, str] | None:
    """(field, problem) when `arch` is not a known name (naming close matches), or when `pretrained` asks weights
    of one of ens's from-scratch nets; None when it is fine."""
    if is_classical(arch):  # features + a scikit-learn classifier (`classical.py`)
        from .classical import parse_arch

        try:
            parse_arch(arch)
        except ValueError as e:
            return "arch", str(e)
        return None
    kind, name = split_arch(arch)
    all_known = known_architectures()
    known = all_known[kind]
    if name in known or (kind == "timm" and name.split(".")[0] in known):  # timm tags: 'convnext_small.fb_in22k'
        if kind == "ens" and pretrained not in (None, False):
            return "pretrained", from_scratch_problem(arch, pretrained)
        return None
    # candidates, as they would be written: a plain name may also be one of ens's nets
    pool = {(c if kind == "timm" else f"{kind}:{c}"): c for c in known}
    if kind == "timm":
        pool |= {f"ens:{c}": c for c in all_known["ens"]}
    close = difflib.get_close_matches(name, list(pool.values()), n=3, cutoff=0.6)
    written = [w for c in close for w, bare in pool.items() if bare == c]
    hint = f"did you mean {', '.join(dict.fromkeys(written))}?" if close else "`ens models PATTERN` lists the names"
    return "arch", f"unknown {kind} architecture '{name}'; {hint}"


def from_scratch_problem(arch: str, pretrained) -> str:
    return (f"{arch} is one of ens's own nets, trained from scratch, with no pretrained weights to load "
            f"(pretrained: {pretrained!r}); set pretrained: false (in the member or in defaults)")


def from_scratch_error(arch: str, where: str, pretrained) -> str:
    return f"{where}: {from_scratch_problem(arch, pretrained)}"


def with_size_kwargs(create, final_size):
    """`create(**size kwargs)`: ViT-style models are built for one input size, so they get the member's, and may
    take other sizes (progressive resizing) and sizes that are not a multiple of the patch (the seed's ViT at
    244 px) by resampling the position embedding and padding the input. Constructors that reject these
    arguments (convolutional nets take any size) are called again without them."""
    kwargs = {"img_size": final_size if isinstance(final_size, int) else tuple(final_size),
              "dynamic_img_size": True, "dynamic_img_pad": True}
    while True:
        try:
            model = create(**kwargs)
            model.ens_size_kwargs = kwargs  # what it took (`plan.ModelStats`: without img_size, sizes are shared)
            return model
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
    if kind == "ens":
        return nets.build(name, n_classes)
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
    the pretrained weights' own statistics, or ImageNet's for from-scratch bodies (fastai adds none then).
    ens's own nets (`nets.py`) get a plain fastai Learner split into body and head, like vision_learner's."""
    from fastai.vision.all import Learner, imagenet_stats, vision_learner

    kind, name = split_arch(member.arch)
    if kind == "ens":
        if member.pretrained is not False:
            raise ConfigError(from_scratch_error(member.arch, f"member {member.name}: pretrained", member.pretrained))
        learn = Learner(dls, nets.build(name, dls.c), metrics=metrics, cbs=list(cbs), splitter=nets.body_head_split)
        return learn, imagenet_stats
    common = dict(normalize=False, metrics=metrics, cbs=list(cbs))
    if kind == "timm":
        weights = timm_weights_kwargs(member.pretrained)
        with fetching_weights(member):
            learn = with_size_kwargs(lambda **kw: vision_learner(dls, name, **common, **weights, **kw),
                                     member.final_size)
        cfg = learn.model[0].model.pretrained_cfg
        stats = (cfg["mean"], cfg["std"]) if weights["pretrained"] and "mean" in cfg else imagenet_stats
        return learn, stats
    if isinstance(member.pretrained, str):
        raise ConfigError(f"member {member.name}: weights files are supported for timm architectures; "
                          f"use timm's name for {name} or pretrained: true/false")
    arch = _vision_builder(kind, name)
    with fetching_weights(member):
        learn = vision_learner(dls, arch, pretrained=bool(member.pretrained), **common)
    return learn, imagenet_stats


@contextmanager
def fetching_weights(member):
    """Around building a learner: says which weights are downloaded (when they are not cached), and turns a
    failed download (offline: LocalEntryNotFoundError; no network: an OSError after the hub's retries) into one
    line naming the arch, where the weights come from and the fixes."""
    import sys

    source = weights_source(member.arch, member.pretrained)
    if source and not weights_cached(source):
        print(f"downloading weights for {member.arch} ({source}) ...", file=sys.stderr, flush=True)
    try:
        yield
    except OSError as e:  # the hub's errors (LocalEntryNotFoundError, HTTP errors) and URL errors are OSErrors
        if member.pretrained is not True or isinstance(e, ConfigError):
            raise
        reason = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())[:200]
        raise EnsError(f"member {member.name}: cannot fetch the pretrained weights of {member.arch} "
                       f"({source or 'its library'}): {type(e).__name__}: {reason}; {weights_fixes()}") from None


def list_models(pattern: str | None = None, pretrained_only: bool = False) -> list[tuple[str, str, str]]:
    """(name as written in a YAML `arch:`, library, note) of the nameable architectures matching `pattern`, for
    `ens models`: ens's own nets first, then timm's, torchvision's and fastai's. From the memoised lists (timm is
    not imported when they are memoised).

    `pattern` is an fnmatch pattern, case-insensitive (`convnext*`, `*in22k*`); one without wildcards matches
    anywhere in the name (`convnext` = `*convnext*`); a library prefix restricts to that library
    (`ens:*`, `torchvision:resnet*`). Names are matched without their prefix; timm's pretrained tags too
    (`convnext_small.fb_in22k`). `pretrained_only`: only names with pretrained weights, that is timm's
    tagged names (`convnext_small.fb_in22k`) and the deprecated aliases of one, each its own row; otherwise
    one row per architecture, its note counting its pretrained tags."""
    library = None
    if pattern and ":" in pattern:
        prefix, _, rest = pattern.partition(":")
        if prefix.lower() in PREFIXES:
            library, pattern = prefix.lower(), rest
    pattern = (pattern or "*").lower()
    if not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"

    def match(name: str) -> bool:
        return fnmatch.fnmatchcase(name.lower(), pattern)

    rows: list[tuple[str, str, str]] = []
    if library in (None, "ens") and not pretrained_only:
        rows += [(f"ens:{n}", "ens", nets.NOTES.get(n, "from scratch")) for n in nets.names() if match(n)]
    if library in (None, "timm"):
        memo = _memo()
        deprecated = memo["timm_deprecated"]
        tags: dict[str, list[str]] = {}
        for n in memo["timm"]:
            if "." in n:
                tags.setdefault(n.split(".")[0], []).append(n)
        if pretrained_only:
            for n in memo["timm"]:
                if "." in n and match(n):
                    rows.append((n, "timm", "pretrained"))
                elif n in deprecated and "." in deprecated[n] and deprecated[n] in memo["timm"] and match(n):
                    rows.append((n, "timm", f"deprecated alias of {deprecated[n]}"))
        else:
            for n in memo["timm"]:
                if "." in n or not match(n):
                    continue
                if n in deprecated:
                    note = f"deprecated alias of {deprecated[n]}"
                else:
                    k = len(tags.get(n, ()))
                    note = f"{k} pretrained tag{'s' if k != 1 else ''}" if k else "no pretrained weights"
                rows.append((n, "timm", note))
    if not pretrained_only:
        memo = _memo() if library in (None, "torchvision", "fastai") else {}
        for lib in ("torchvision", "fastai"):
            if library in (None, lib):
                rows += [(f"{lib}:{n}", lib, "") for n in memo[lib] if match(n)]
    return rows


def _size_text(size) -> str:
    return f"[{size[0]}, {size[1]}]" if isinstance(size, (tuple, list)) else str(size)


def input_sizes(member) -> list:
    """The distinct input sizes the member's network sees, as `data.dataloaders` makes them: each stage's size
    (the batch augmentation brings items presized at `resize.size` to it; without one, items are resized to it)."""
    return list(dict.fromkeys(tuple(s) if isinstance(s, (tuple, list)) else s for s, _ in member.stage_plan))


def check_input_size(member, n_classes: int) -> None:
    """Raise a one-line ConfigError when the member's network cannot take one of its input sizes (a 4x4 stem on
    2 px, a 16 px patch on 8 px): the network is built with random weights (nothing is downloaded) and run
    forward once per distinct size, one image, in eval mode without gradients, on the CPU. The error names the
    member, the size and a size the network does take (doubling the failing one). Costs one model build and a
    forward pass per size (well under a second for most nets); call it before training a member. Runs on one
    CPU thread: one image through a network gains nothing from a second one, which only adds the wake-ups (and on
    a loaded machine the waits: up to half a second) of torch's thread pool; the count is put back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_input_size(member, n_classes)
    finally:
        torch.set_num_threads(threads)


def _check_input_size(member, n_classes: int) -> None:
    import torch

    model = build_model(member.arch, n_classes, member.final_size).eval()

    def fails(size, net=None) -> Exception | None:
        h, w = size if isinstance(size, tuple) else (size, size)
        try:
            with torch.no_grad():
                (model if net is None else net)(torch.zeros(1, 3, h, w))
        except (RuntimeError, ValueError, AssertionError, IndexError) as e:
            return e
        return None

    final = tuple(member.final_size) if isinstance(member.final_size, (tuple, list)) else member.final_size
    # the size the network is built for first (a ViT built for too small a size fails at every size)
    for size in sorted(input_sizes(member), key=lambda s: s != final):
        error = fails(size)
        if error is None:
            continue
        larger = size
        for _ in range(8):  # up to 256x the failing size
            larger = tuple(2 * s for s in larger) if isinstance(larger, tuple) else 2 * larger
            if max(larger if isinstance(larger, tuple) else (larger,)) > 2048:
                break
            if fails(larger) is None or fails(larger, build_model(member.arch, n_classes, larger).eval()) is None:
                detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
                raise ConfigError(f"member {member.name} ({member.arch}): size {_size_text(size)} is too small for "
                                  f"{member.arch} ({type(error).__name__}: {detail}); it runs at "
                                  f"{_size_text(larger)}: raise the size (size, stages or resize.size) of "
                                  f"member {member.name}")
        raise error  # no larger size helps: not a size problem
