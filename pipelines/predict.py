"""TTA probabilities of a trained member on the validation and the test set (the plain pass and the mean of the
augmented passes kept as well), and a member's learner rebuilt from its kept weights."""

from __future__ import annotations

import time

from .config import Member
from .data import CompetitionData


def predict_member(learn, member: Member, data: CompetitionData, progress=None) -> tuple[dict, float]:
    """{'valid_plain', 'valid_tta', 'test_plain', 'test_tta', 'valid_targets'} as float32/int arrays (and
    'valid_aug', 'test_aug', the mean of the augmented passes, when there are any), and seconds.

    The random generators are seeded from the member's seed first, so the same weights give the same TTA
    whether they were just trained, resumed or read back from the cache. The TTA blend is fastai's
    `lerp(aug, plain, beta)`, computed from the kept arrays (`cache.tta_blend`): another beta costs nothing.
    """
    import numpy as np

    start = time.perf_counter()
    from .data import test_loader

    test_dl = test_loader(learn.dls, data)
    out = {}
    passes = member.tta_passes
    vocab = list(learn.dls.vocab)
    for split, dl in (("valid", learn.dls.valid), ("test", test_dl)):
        seed_split(member, split)
        if not len(dl.dataset):  # a refit on every training image validates on none
            empty = np.zeros((0, len(vocab)), dtype="float32")
            kinds = ("plain", "tta", *(("aug",) if passes else ()), *(f"view_{v}" for v in member.tta.view_names))
            out.update({f"{split}_{k}": empty for k in kinds})
            continue
        views = f", views {', '.join(member.tta.view_names)}" if member.tta.views else ""
        if progress is None:
            out.update({f"{split}_{k}": v for k, v in tta_probs(learn, dl, member).items()})
            continue
        task = progress.add_task(f"  TTA {split} ({passes}+1 passes{views})", total=tta_batches(len(dl), member))
        try:
            with learn.added_cbs(_advancing(progress, task)):  # the bar moves with each batch predicted
                out.update({f"{split}_{k}": v for k, v in tta_probs(learn, dl, member).items()})
        finally:
            progress.remove_task(task)
    out["valid_targets"] = np.array([vocab.index(l) for l in data.valid_labels], dtype="int64")
    return out, time.perf_counter() - start


def tta_batches(n_batches: int, member: Member) -> int:
    """How many batches `tta_probs` predicts for a loader of `n_batches`: the plain pass, the augmented passes and
    the views' crops and flips (the TTA bar's total)."""
    passes, views = member.tta_passes, member.tta.view_names
    per_view = sum(len(view_transforms(v)) for v in views)
    if not passes and not views:
        return n_batches
    if passes and member.resize.method != "squish":  # fastai's tta: n + 1 loops; then the views in one stream
        return n_batches * (passes + 1 + (1 + per_view if views else 0))
    return n_batches * (1 + passes + per_view)


def _advancing(progress, task):
    """A fastai callback advancing `task` by one per batch predicted."""
    from fastai.callback.core import Callback

    class Advance(Callback):
        def after_batch(self):
            if not self.training:
                progress.advance(task)

    return Advance()


def seed_split(member: Member, split: str) -> None:
    """Seed the random TTA passes of `split` ('valid' or 'test', `config.TTA_SEEDING`): a notebook that predicts the
    test images alone draws what `ens run` drew after the validation pass. Seeds only (cuDNN flags are
    training's), and not the training seed: TTA draws its own augmentations."""
    from fastai.vision.all import set_seed

    set_seed(member.seed + (1 if split == "valid" else 2))


def tta_probs(learn, dl, member: Member) -> dict:
    """{'plain', 'tta'} (and 'aug' with augmented passes) probabilities of `dl`'s images as float32 arrays:
    the member's augmented passes blended with the plain one by beta (fastai's `tta`). Without augmented
    passes worth making (`Member.tta_passes`: none asked, or all would equal the plain pass) TTA is the plain pass.

    With a squish resize (items are the same in every pass) each batch is loaded once and augmented n times
    (`_OnceLoaded`); fastai's `tta` loads the images again for every pass, which is how crop and pad resizes,
    random per item, are still predicted."""
    from .cache import tta_probs_of

    passes, views = member.tta_passes, member.tta.view_names
    if not passes and not views:
        plain = learn.get_preds(dl=dl)[0].float().numpy()
        return {"plain": plain, "tta": plain}
    out = {}
    if passes and member.resize.method != "squish":  # crop/pad: fastai's tta draws a window per item and pass
        aug, plain = learn.tta(dl=dl, n=passes, beta=None)[0]
        out.update(aug=aug.float().numpy(), plain=plain.float().numpy())
        passes = 0  # the stream below makes the plain pass and the views only
    if passes or views:
        stream = _OnceLoaded(dl, passes, views)
        out = {**stream.split(learn.get_preds(dl=stream)[0].float()), **out}
    out["tta"] = tta_probs_of({f"x_{k}": v for k, v in out.items()}, "x", member.tta.beta, member.tta_passes, views)
    return out


class _OnceLoaded:
    """`dl`'s batches, each loaded once and yielded 1 + n times through its batch transforms: plain (validation
    mode), then n augmented (training mode, as fastai's `tta` sets it), for `Learner.get_preds` to predict in one
    loop with every callback (precision, memory format) in place; `split` puts the predictions back per pass."""

    def __init__(self, dl, passes: int, views: list[str] = ()):
        self.raw = dl.new(after_batch=None, shuffle=False, drop_last=False)  # collated items, moved to the device
        self.transforms, self.passes, self.sizes = dl.after_batch, passes, []
        self.views = {name: view_transforms(name) for name in views}  # name -> its crops/flips, averaged
        self.per_batch = 1 + passes + sum(len(fs) for fs in self.views.values())

    def __len__(self):
        return len(self.raw) * self.per_batch

    def __iter__(self):
        self.sizes = []
        try:
            for batch in self.raw:
                self.sizes.append(len(batch[0]))
                for split_idx in [1] + [0] * self.passes:
                    self.transforms.split_idx = split_idx
                    out = self.transforms(batch)
                    if split_idx == 1:
                        plain = out
                    yield out
                for fs in self.views.values():  # deterministic views of the plain pass's batch
                    for f in fs:
                        yield (f(plain[0]), *plain[1:])
        finally:
            self.transforms.split_idx = 1

    def split(self, preds) -> dict:
        """{'plain', 'aug' (the augmented passes' mean), 'view_<name>'} from the predictions of one iteration, rows
        in `dl`'s order."""
        import torch

        parts: dict[str, list] = {"plain": [], **({"aug": []} if self.passes else {}),
                                  **{f"view_{v}": [] for v in self.views}}
        at = 0
        for size in self.sizes:
            chunk = preds[at:at + size * self.per_batch].reshape(self.per_batch, size, -1)
            parts["plain"].append(chunk[0])
            if self.passes:
                parts["aug"].append(chunk[1:1 + self.passes].mean(0))
            k = 1 + self.passes
            for name, fs in self.views.items():
                parts[f"view_{name}"].append(chunk[k:k + len(fs)].mean(0))
                k += len(fs)
            at += size * self.per_batch
        return {name: torch.cat(p).numpy() for name, p in parts.items()}


def view_transforms(name: str) -> list:
    """The functions of a TTA view (`TTA.view_names`) on a normalised batch N×C×H×W; a view of several (five
    crops) is their mean. A zoom crops the centre and resizes it back, so any network takes it."""
    import torch.nn.functional as F

    def zoom(top: float, left: float, share: float):
        def f(x):
            h, w = x.shape[-2:]
            ch, cw = max(1, round(h * share)), max(1, round(w * share))
            y0, x0 = round((h - ch) * top), round((w - cw) * left)
            return F.interpolate(x[..., y0:y0 + ch, x0:x0 + cw], size=(h, w), mode="bilinear", align_corners=False)
        return f

    if name == "hflip":
        return [lambda x: x.flip(-1)]
    if name == "vflip":
        return [lambda x: x.flip(-2)]
    if name.startswith("scale"):
        return [zoom(0.5, 0.5, 1 / float(name.removeprefix("scale")))]
    share = float(name.removeprefix("crops"))
    return [zoom(t, l, share) for t, l in ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))]


def kept_learner(member_config: dict, data: CompetitionData, weights, normalize):
    """(Member, Learner) of a kept model, from the member config its meta recorded: fp32, no loader workers, from
    the images — it predicts whatever paths it is given (a decoded copy holds the same pixels)."""
    member = Member.model_validate(member_config).model_copy(update={"num_workers": 0, "decode": False})
    return member, learner_from_weights(member, data, weights, normalize).to_fp32()


def paths_probs(learn, member: Member, paths) -> dict:
    """`tta_probs` of the image files `paths`, the random passes seeded as for the test images (`seed_split`)."""
    dl = learn.dls.test_dl([str(p) for p in paths])
    seed_split(member, "test")
    return tta_probs(learn, dl, member)


def learner_from_weights(member: Member, data: CompetitionData, weights, normalize, precision: str = "fp32"):
    """The member's Learner at its final size with the kept weights `weights` (a state dict or a file), its
    inputs normalised with `normalize` (mean, std), under `precision` on CUDA; nothing is downloaded."""
    import torch
    from fastai.vision.all import Normalize, accuracy, noop

    from .accel import accelerate
    from .data import dataloaders
    from .models import build_learner

    bare = member.model_copy(update={"pretrained": False})  # the weights come from the file
    dls = dataloaders(data, bare, member.final_size)
    learn, _ = build_learner(dls, bare, metrics=[accuracy])
    dls.add_tfms([Normalize.from_stats(*normalize)], "after_batch")
    state = torch.load(weights, map_location="cpu") if not isinstance(weights, dict) else weights
    learn.model.load_state_dict(state)
    learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
    learn.logger = noop
    if precision == "fp16":
        learn.to_fp16()
    elif precision == "bf16":
        learn.to_bf16()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    accelerate(learn, member, device, precision=precision, compile_model=False)  # channels-last where it pays
    return learn
