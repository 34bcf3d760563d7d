"""5. TTA: its cost against one plain prediction pass over the same images (n augmented passes + 1 plain
expected, so n + 1 = 5 for n = 4; anything beyond is overhead). ens loads each batch once for the n + 1 passes.
The member as ens runs it (its DataLoader workers), from the images and from its decoded copy."""

import time

from common import ONE_MEMBER, digits_project, median


def main(repeats: int = 3) -> list[str]:
    from pipelines.config import Member, Project, load_competition
    from pipelines.data import load_data, test_loader
    from pipelines.predict import tta_probs
    from pipelines.train import train_member

    project = Project(digits_project({"one": ONE_MEMBER}))
    data = load_data(project, load_competition(project, "digits"))
    rows = []
    for decode in (False, True):
        member = Member(name="m", arch="test_resnet", pretrained=False, size=32, epochs=1, batch_size=64,
                        tta={"n": 4}, decode=decode)
        learn = train_member(member, data).learn
        dl = test_loader(learn.dls, data)
        learn.get_preds(dl=dl)  # warm-up
        plain, tta = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            learn.get_preds(dl=dl)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            tta_probs(learn, dl, member)
            tta.append(time.perf_counter() - start)
        p, t = median(plain), median(tta)
        how = "decoded copy" if decode else "from the images"
        rows.append(f"| 5. TTA (n = 4) / one plain pass, {len(dl.dataset)} test images, {how} | {t:.2f} s / {p:.2f} s "
                    f"| **{t / p:.2f}** | <= n + 1 = 5 |")
    return rows


if __name__ == "__main__":
    print("\n".join(main()))
