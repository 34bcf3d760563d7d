"""What the notebook runs on Kaggle (and the local check runs here): the members rebuilt from the dataset's
weights predict whatever test images the competition's folder holds — the hidden test set at scoring — with their
TTA; the blend is written as the submission and checked against the sample submission found beside them.

`python -m pipelines.notebook.offline --manifest M --input I --out O` (the generated script calls `main`)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..config import Competition
from ..errors import EnsError

TIMING = "ens-timing.json"  # written beside the submission: images, seconds to load and to predict


def find_competition_data(comp: Competition, input_root: Path) -> Path:
    """The competition's folder under /kaggle/input: <slug>/ (Kaggle's mount), else any folder up to two levels
    down holding the test folder and the sample submission."""
    candidates = [input_root / (comp.kaggle or comp.name), input_root / "competitions" / (comp.kaggle or comp.name)]
    candidates += sorted(input_root.glob("*")) + sorted(input_root.glob("*/*"))
    for folder in candidates:
        if (folder / comp.test_images).is_dir() and (folder / comp.sample_submission).is_file():
            return folder
    raise EnsError(f"no folder under {input_root} holds {comp.test_images}/ and {comp.sample_submission}: add the "
                   f"competition '{comp.kaggle or comp.name}' as the notebook's input")


def _offline_data(comp: Competition, root: Path, vocab: list[str], test_paths: list[str]):
    """A CompetitionData that can build a member's loaders without its training images: one placeholder item per
    class (never loaded) gives fastai the vocab; only the test images are read."""
    from ..data import CompetitionData

    placeholder = test_paths[:1] * (2 * len(vocab))
    return CompetitionData(comp, root, placeholder, vocab * 2, [False] * len(vocab) + [True] * len(vocab),
                           test_paths, "offline")


def member_test_probs(model: dict, folder: Path, data, kind: str):
    """One kept model's test probabilities (`kind` 'tta' or 'plain'), drawn as `ens run` drew them."""
    from ..predict import kept_learner, paths_probs

    member, learn = kept_learner(model["member"], data, folder / model["file"], model["normalize"])
    return paths_probs(learn, member, [data.root / p for p in data.test_paths])[kind]


def blend(probs: list, spec: dict):
    from .. import ensemble

    if spec["method"] == "weights":  # a learned blend's weights (greedy counts, hill climbing's, maybe negative)
        return ensemble.clipped_blend(probs, spec["weights"])
    from ..config import Combine

    return ensemble.fixed_blend(Combine(method=spec["method"], power=spec["power"]), probs, spec["weights"])


def predict(manifest_path: Path, input_root: Path, out: Path, say=print) -> dict:
    """Write and check the submission at `out`; {rows, images, load_seconds, predict_seconds}."""
    import numpy as np

    from ..data import check_sample_ids, list_test, submission_ids
    from ..submission import check_submission, write_submission

    start = time.perf_counter()
    manifest = json.loads(manifest_path.read_text())
    folder = manifest_path.parent
    comp = Competition.model_validate(manifest["competition"])
    root = find_competition_data(comp, input_root)
    test_paths = list_test(comp, root)
    check_sample_ids(comp, root, test_paths)
    vocab = manifest["vocab"]
    data = _offline_data(comp, root, vocab, test_paths)
    say(f"ens {manifest['ens']}: {len(test_paths)} test images in {root}, {len(manifest['members'])} members")
    loaded, predicting = time.perf_counter() - start, time.perf_counter()
    members = []
    for m in manifest["members"]:
        t = time.perf_counter()
        members.append(np.mean([member_test_probs(model, folder, data, manifest["probs"])
                                for model in m["models"]], axis=0))
        say(f"  {m['name']}: {len(m['models'])} model(s), {time.perf_counter() - t:.1f} s")
    test = blend(members, manifest["blend"])
    sample = root / comp.sample_submission
    write_submission(out, comp, sample, submission_ids(comp, test_paths), test, vocab)
    rows = check_submission(out, sample, comp, vocab)
    import torch

    timing = {"rows": rows, "images": len(test_paths), "load_seconds": loaded,
              "predict_seconds": time.perf_counter() - predicting, "ens_from": __file__,
              "device": "cuda" if torch.cuda.is_available() else "cpu",
              "libraries": {name: getattr(sys.modules.get(name), "__file__", None) for name in ("timm", "fastai")}}
    (out.parent / TIMING).write_text(json.dumps(timing))
    say(f"wrote {out} ({rows} rows, checked against {comp.sample_submission}) in "
        f"{time.perf_counter() - start:.1f} s")
    return timing


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pipelines.notebook.offline")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True, help="the notebook's input folder (/kaggle/input)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        predict(args.manifest, args.input, args.out)
    except EnsError as e:
        print(f"ens error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
