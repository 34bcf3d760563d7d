"""TTA probabilities of a trained member on the validation and the test set (the plain pass kept as well)."""

from __future__ import annotations

import time

from .config import Member
from .data import CompetitionData


def predict_member(learn, member: Member, data: CompetitionData, progress=None) -> tuple[dict, float]:
    """{'valid_plain', 'valid_tta', 'test_plain', 'test_tta', 'valid_targets'} as float32/int arrays, and seconds.

    fastai's `tta` makes n augmented passes and one plain pass; with beta=None it returns both, so the plain
    probabilities cost nothing extra and the TTA blend is fastai's own `lerp(aug, plain, beta)`.
    """
    import numpy as np

    start = time.perf_counter()
    test_dl = learn.dls.test_dl([str(data.root / p) for p in data.test_paths])
    out = {}
    for split, dl in (("valid", learn.dls.valid), ("test", test_dl)):
        task = progress.add_task(f"  TTA {split} ({member.tta.n}+1 passes)", total=None) if progress else None
        out[f"{split}_plain"], out[f"{split}_tta"] = tta_probs(learn, dl, member)
        if task is not None:
            progress.remove_task(task)
    vocab = list(learn.dls.vocab)
    out["valid_targets"] = np.array([vocab.index(l) for l in data.valid_labels], dtype="int64")
    return out, time.perf_counter() - start


def tta_probs(learn, dl, member: Member):
    """(plain, TTA) probabilities of `dl`'s images as float32 arrays: the member's n augmented passes blended
    with the plain one by beta (fastai's `tta`; with n = 0 both are the plain pass)."""
    import torch

    if member.tta.n > 0:
        aug, plain = learn.tta(dl=dl, n=member.tta.n, beta=None)[0]
        blended = torch.lerp(aug, plain, member.tta.beta)
    else:
        plain = blended = learn.get_preds(dl=dl)[0]
    return plain.float().numpy(), blended.float().numpy()
