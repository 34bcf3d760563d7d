"""8. The paddy final ensemble's members on the GPU: per member and stage size, ens's end-to-end training throughput
(decoded copy of paddy-shaped JPEGs, the member's own batch, precision and augmentation) against the model alone on
in-memory tensors of the same shape (the model's own speed: the limit), peak memory against the card's total, and
the 10-epoch time this implies on Paddy's 10,407 training images. Without CUDA every arm prints
"skipped: no CUDA", so the script runs unchanged on a GPU machine.
"""

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

PADDY_TRAIN_IMAGES = 10407


def members():
    """(member, [(size, epochs)]) of ensembles/paddy/final.yaml, its defaults applied."""
    from pipelines.config import Project, load_ensemble

    _, ens, _ = load_ensemble(Project(REPO), "paddy/final.yaml", ["members.*.pretrained=false"])
    return [(m, [(s if isinstance(s, int) else tuple(s), e) for s, e in m.stage_plan]) for m in ens.members]


def model_only(member, size, steps: int = 20) -> tuple[float, float]:
    """(images/s, peak GiB) of training steps on in-memory tensors under the member's precision."""
    import torch

    from pipelines.accel import channels_last_model
    from pipelines.models import build_model
    from pipelines.train import device_precision

    _, precision = device_precision(member.precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    model = channels_last_model(build_model(member.arch, 10, size), "cuda", precision).cuda().train()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(member.batch_size, 3, h, w, device="cuda")
    y = torch.randint(0, 10, (member.batch_size,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 3):
        if step == 3:  # warmed up
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    torch.cuda.synchronize()
    return steps * member.batch_size / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30


def end_to_end(member, size, data) -> float:
    """ens's training images/s at `size` (the epochs after the first), from the decoded copy."""
    from common import trained_images_per_second

    staged = member.model_copy(update={"stages": [(size, 3)], "decode": True, "freeze_epochs": 0})
    return trained_images_per_second(staged, data)


def main() -> list[str]:
    import torch

    rows = []
    plan = members()
    if not torch.cuda.is_available():
        for member, stages in plan:
            for size, _ in stages:
                rows.append(f"| 8. GPU: {member.name} ({member.arch}) at {size}: end-to-end / model-only, peak memory, "
                            "10-epoch time | skipped: no CUDA | | >= 0.9 |")
        return rows
    from paddy_like import make_paddy_like

    from pipelines.config import Project, load_competition
    from pipelines.data import load_data

    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data_root = make_paddy_like(tmp / "paddy", per_class=40, n_test=8)
        (tmp / "project/competitions").mkdir(parents=True)
        text = (REPO / "competitions/paddy.yaml").read_text()
        (tmp / "project/competitions/paddy.yaml").write_text(text + f"\ndata_dir: {data_root}\n")
        project = Project(tmp / "project")
        data = load_data(project, load_competition(project, "paddy"))
        for member, stages in plan:
            seconds = 0.0
            for size, epochs in stages:
                limit, peak = model_only(member, size)
                rate = end_to_end(member, size, data)
                seconds += epochs * PADDY_TRAIN_IMAGES * 0.8 / rate  # the holdout's 80 % trains
                rows.append(f"| 8. GPU: {member.name} ({member.arch}) at {size}: end-to-end / model-only, peak "
                            f"{peak:.1f} of {total:.1f} GiB | {rate:.0f} / {limit:.0f} images/s | "
                            f"**{rate / limit:.2f}** | >= 0.9 |")
            rows.append(f"| 8. GPU: {member.name}: implied time of its {sum(e for _, e in stages)} epochs on Paddy "
                        f"| {seconds / 60:.1f} min | | |")
    return rows


if __name__ == "__main__":
    print("\n".join(main()))
