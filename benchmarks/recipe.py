"""10. The winners' recipe on digits (issue 17): what each member option does to the validation (or out-of-fold)
and test accuracy and to the training time, against the same member without it — honest numbers, "no gain"
included.

The base is `ensembles/digits/final.yaml`'s resnet (test_resnet from scratch, 8 epochs at 32 px, aug_transforms,
TTA n 4). Each variant changes one thing. The teacher of pseudo-labels and distillation is final.yaml's four
members (trained first; in cv, their fold models). `--cv` runs the same variants 5-fold (the out-of-fold
accuracy, every training image predicted by a model that did not see it). The test accuracy is on the 359 held-out
test answers (one image is 0.0028); the validation one on 286 images (0.0035), or on 1438 OOF rows.

    python benchmarks/recipe.py [--cv]
"""

import sys

from common import REPO, digits_project

VARIANTS = {
    "base": "{}",
    "label smoothing 0.1": "{loss: {label_smoothing: 0.1}}",
    "mixup 0.4": "{mixup: {alpha: 0.4}}",
    "cutmix 1.0": "{cutmix: {alpha: 1.0}}",
    "mixup or cutmix (each batch)": "{mixup: {alpha: 0.4}, cutmix: {alpha: 1.0}}",
    "EMA 0.99": "{ema: {decay: 0.99}}",
    "average of the last 3 epochs": "{average: {epochs: 3}}",
    "TTA views scale 1.1 + crops 0.9": "{tta: {n: 4, beta: 0.5, views: [{scale: 1.1}, {crops: 0.9}]}}",
    "pseudo-labels (teacher ≥ 0.95)": "{pseudo: {teacher: digits/final.yaml, threshold: 0.95}}",
    "distilled from the teacher": "{decode: true, distill: {teacher: digits/final.yaml}}",
    "classical: EM traces + colour histogram / logistic": "{arch: 'classical:em_traces+color_hist/logistic'}",
}


def _yaml(cv: bool) -> str:
    final = (REPO / "ensembles/digits/final.yaml").read_text()
    head = final.split("members:")[0]
    members = "".join(f"  - {_member(i, body)}\n" for i, body in enumerate(VARIANTS.values()))
    return ("validation: cv\n" if cv else "") + head + "members:\n" + members


def _member(i: int, body: str) -> str:
    inner = body.strip()[1:-1].strip()
    extra = f", {inner}" if inner else ""
    arch = "" if "arch:" in inner else ", arch: test_resnet"
    return f"{{name: v{i}{arch}{extra}}}"


def main(cv: bool = False) -> list[str]:
    from pipelines.config import Project
    from pipelines.run import run_ensemble

    final = (REPO / "ensembles/digits/final.yaml").read_text()
    root = digits_project({"final": ("validation: cv\n" if cv else "") + final, "recipe": _yaml(cv)})
    project = Project(root)
    teacher = run_ensemble(project, "digits/final.yaml", submit=False)
    result = run_ensemble(project, "digits/recipe.yaml", submit=False)
    what = "OOF" if cv else "valid"
    rows = [f"| 10. recipe ({'5-fold cv' if cv else 'holdout'}): {name} | {what} {o.entry.meta['metrics']['tta_accuracy']:.4f}, "
            f"test {o.test_score:.4f}, train {o.entry.meta['timings'].get('train_seconds', 0):.0f} s | "
            f"**{o.entry.meta['metrics']['tta_accuracy'] - result.members[0].entry.meta['metrics']['tta_accuracy']:+.4f}** "
            f"{what} | vs base |" for name, o in zip(VARIANTS, result.members)]
    rows.append(f"| 10. recipe ({'5-fold cv' if cv else 'holdout'}): the teacher (final.yaml's 4 members, mean) | "
                f"{what} {teacher.valid_score:.4f}, test {teacher.test_score:.4f} | | reference |")
    return rows


if __name__ == "__main__":
    print("\n".join(main("--cv" in sys.argv)))
