"""2. Efficiency: training throughput of an ens member (its epochs after the first, images/s) against a plain
PyTorch loop over the same network on tensors already in memory — the model-bound limit of this machine.
Same network (models.build_model), batch 64, Adam, cross-entropy, 32 px; goal >= 0.9. The member trains as ens
runs it (its DataLoader workers, the batch augmentation on the CPU here), from its decoded copy and from the images."""

import time

from common import ONE_MEMBER, digits_project, median, trained_images_per_second


def ens_images_per_second(root, decode: bool) -> float:
    from pipelines.config import Member, Project, load_competition
    from pipelines.data import load_data

    project = Project(root)
    data = load_data(project, load_competition(project, "digits"))
    member = Member(name="m", arch="test_resnet", pretrained=False, size=32, epochs=4, lr=0.005, batch_size=64,
                    decode=decode, aug_transforms={"do_flip": False, "max_rotate": 10, "max_warp": 0.1,
                                                   "max_lighting": 0.2})
    return trained_images_per_second(member, data)


def plain_images_per_second(n_images: int = 1152, epochs: int = 3) -> float:
    import torch

    from pipelines.models import build_model

    torch.manual_seed(0)
    model = build_model("test_resnet", 10, 32)
    x, y = torch.randn(n_images, 3, 32, 32), torch.randint(0, 10, (n_images,))
    opt = torch.optim.Adam(model.parameters(), lr=0.005)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seconds = images = 0
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        for i in range(0, n_images - 63, 64):
            opt.zero_grad()
            loss_fn(model(x[i:i + 64]), y[i:i + 64]).backward()
            opt.step()
            if epoch:
                images += 64
        if epoch:  # the first epoch warms up
            seconds += time.perf_counter() - start
    return images / seconds


def main(repeats: int = 3) -> list[str]:
    root = digits_project({"one": ONE_MEMBER})
    rates = {"decoded": [], "images": [], "plain": []}
    for _ in range(repeats):
        rates["decoded"].append(ens_images_per_second(root, True))
        rates["images"].append(ens_images_per_second(root, False))
        rates["plain"].append(plain_images_per_second())
    r = {k: median(v) for k, v in rates.items()}
    return [f"| 2. efficiency: ens member training, {how} / plain PyTorch loop on in-memory tensors | "
            f"{r[arm]:.0f} / {r['plain']:.0f} images/s | **{r[arm] / r['plain']:.2f}** | >= 0.9 |"
            for arm, how in (("decoded", "decoded copy"), ("images", "from the images (PNGs)"))]


if __name__ == "__main__":
    print("\n".join(main()))
