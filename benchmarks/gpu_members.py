"""8. The paddy final ensemble's members on the GPU: per member and stage size, ens's end-to-end training throughput
(decoded copy of paddy-shaped JPEGs, the member's own batch, precision and augmentation) against the model alone on
in-memory tensors of the same shape (the model's own speed: the limit), peak memory against the card's total, and
the 10-epoch time this implies on Paddy's 10,407 training images. Arms per member and size:

- eager: ens with a memory budget of the whole card (batch 32 in one step, as the model-only arm) / model-only;
- compile: the same with `compile: true` / the model-only arm compiled (torch.compile, inductor);
- 7 GiB: ens under its default 7 GiB budget (the 8 GB card: the plan may split the batch) / model-only at batch
  32 under a 7 GiB per-process cap (out of memory is reported as such).

Each arm sets the per-process memory cap it needs and puts the previous one back (`capped`): a member's budget caps
the process (`memory.cuda_probe`), and a cap left on made the model-only arm run out of memory (issue 23).

Without CUDA every row says "skipped: no CUDA". `--dry-run` runs every arm on the CPU with timm's tiny stand-ins
(test_convnext, test_vit) at 32-48 px on a few images, to prove the script goes through (the numbers mean nothing).
Run: python benchmarks/gpu_members.py [--dry-run]
"""

import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(HERE))

PADDY_TRAIN_IMAGES = 10407
CAP_8GB = 7 * 2**30
DRY_ARCHS = {"convnext_small_in22k": "test_convnext", "vit_small_patch16_224": "test_vit"}


def members(dry: bool = False):
    """(member, [(size, epochs)]) of ensembles/paddy/final.yaml, its defaults applied; `dry`: tiny stand-ins."""
    from pipelines.config import Project, load_ensemble

    _, ens, _ = load_ensemble(Project(REPO), "paddy/final.yaml", ["members.*.pretrained=false"])
    out = []
    for m in ens.members:
        stages = [(s if isinstance(s, int) else tuple(s), e) for s, e in m.stage_plan]
        if dry:
            m = m.model_copy(update={"arch": DRY_ARCHS.get(m.arch, "test_convnext"), "batch_size": 8,
                                     "precision": "fp32"})
            stages = [(32, 1), (48, 1)]
        out.append((m, stages))
    return out


@contextmanager
def capped(fraction: float | None, device: str):
    """The process's CUDA memory cap at `fraction` of the card (None: no cap, 1.0) for the block; the previous one
    back afterwards. Nothing on the CPU."""
    if device != "cuda":
        yield
        return
    import torch

    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    previous = getter() if getter else 1.0
    torch.cuda.set_per_process_memory_fraction(1.0 if fraction is None else min(1.0, fraction))
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(previous)


def model_only(member, size, device: str, steps: int = 20, compiled: bool = False) -> tuple[float, float]:
    """(images/s, peak GiB) of training steps on in-memory tensors under the member's precision; (0, peak) when
    the batch does not fit (out of memory)."""
    import torch

    from pipelines.accel import channels_last_model
    from pipelines.memory import free_memory, is_out_of_memory
    from pipelines.models import build_model
    from pipelines.train import device_precision

    _, precision = device_precision(member.precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    cuda = device == "cuda"
    model = channels_last_model(build_model(member.arch, 10, size), device, precision).to(device).train()
    if compiled and cuda:
        model.compile()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(member.batch_size, 3, h, w, device=device)
    y = torch.randint(0, 10, (member.batch_size,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    warm = 3 if not compiled else 6
    try:
        for step in range(steps + warm):
            if step == warm:
                sync()
                start = time.perf_counter()
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sync()
        rate = steps * member.batch_size / (time.perf_counter() - start)
    except Exception as e:
        if not (cuda and is_out_of_memory(e, torch.cuda)):
            raise
        rate = 0.0
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    del model, opt, x, y
    if cuda:
        free_memory(torch.cuda)
    return rate, peak


def end_to_end(member, size, data, epochs: int = 3, **update) -> float:
    """ens's training images/s at `size` (the epochs after the first), from the decoded copy."""
    from common import trained_images_per_second

    staged = member.model_copy(update={"stages": [(size, epochs)], "decode": True, "freeze_epochs": 0, **update})
    return trained_images_per_second(staged, data)


def _data(tmp: Path, per_class: int):
    from paddy_like import make_paddy_like

    from pipelines.config import Project, load_competition
    from pipelines.data import load_data

    data_root = make_paddy_like(tmp / "paddy", per_class=per_class, n_test=8)
    (tmp / "project/competitions").mkdir(parents=True)
    text = (REPO / "competitions/paddy.yaml").read_text()
    (tmp / "project/competitions/paddy.yaml").write_text(text + f"\ndata_dir: {data_root}\n")
    project = Project(tmp / "project")
    return load_data(project, load_competition(project, "paddy"))


def _ratio(rate: float, limit: float) -> str:
    return f"**{rate / limit:.2f}**" if limit else "model-only out of memory"


def arms(member, size, data, device: str, total_gib: float, dry: bool) -> list[str]:
    """The rows of one member at one size: eager, compiled, under 7 GiB."""
    epochs = 2 if dry else 3
    whole = f"{int(total_gib * 2**30)}B" if device == "cuda" else member.gpu_memory
    cap_8gb = CAP_8GB / (total_gib * 2**30) if device == "cuda" else None
    rows, label = [], f"| 8. GPU: {member.name} ({member.arch}) at {size}"
    with capped(None, device):
        limit, peak = model_only(member, size, device)
    with capped(None, device):
        rate = end_to_end(member, size, data, epochs, gpu_memory=whole)
    rows.append(f"{label}: end-to-end / model-only, batch {member.batch_size}, peak {peak:.1f} of {total_gib:.1f} GiB "
                f"| {rate:.0f} / {limit:.0f} images/s | {_ratio(rate, limit)} | >= 0.9 |")
    with capped(None, device):
        climit, _ = model_only(member, size, device, compiled=True)
    with capped(None, device):
        crate = end_to_end(member, size, data, epochs, gpu_memory=whole, compile=True)
    rows.append(f"{label}, compile: true: end-to-end / model-only compiled | {crate:.0f} / {climit:.0f} images/s | "
                f"{_ratio(crate, climit)} | >= 0.9 |")
    with capped(cap_8gb, device):
        slimit, speak = model_only(member, size, device)
    with capped(None, device):  # the member's own 7 GiB budget caps the process itself (`memory.cuda_probe`)
        srate = end_to_end(member, size, data, epochs, gpu_memory="7GiB")
    rows.append(f"{label}, 7 GiB (8 GB card): end-to-end (its plan) / model-only at batch {member.batch_size}, peak "
                f"{speak:.1f} GiB | {srate:.0f} / {slimit:.0f} images/s | {_ratio(srate, slimit)} | >= 0.9 |")
    return rows, rate


def main(argv=()) -> list[str]:
    import torch

    dry = "--dry-run" in argv
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = members(dry)
    rows = []
    if device != "cuda" and not dry:
        for member, stages in plan:
            for size, _ in stages:
                for arm in ("", ", compile: true", ", 7 GiB (8 GB card)"):
                    rows.append(f"| 8. GPU: {member.name} ({member.arch}) at {size}{arm}: end-to-end / model-only, "
                                "peak memory, 10-epoch time | skipped: no CUDA | | >= 0.9 |")
        print("skipped: no CUDA", file=sys.stderr)
        return rows
    if dry:
        torch.set_num_threads(1)
    total = torch.cuda.get_device_properties(0).total_memory / 2**30 if device == "cuda" else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data = _data(Path(tmp), per_class=3 if dry else 40)
        for member, stages in plan:
            seconds = 0.0
            for size, epochs in stages:
                lines, rate = arms(member, size, data, device, total, dry)
                rows += [line.replace("| 8. GPU:", "| 8. GPU (dry run on the CPU):") if dry else line for line in lines]
                seconds += epochs * PADDY_TRAIN_IMAGES * 0.8 / rate  # the holdout's 80 % trains
            if not dry:
                rows.append(f"| 8. GPU: {member.name}: implied time of its {sum(e for _, e in stages)} epochs on "
                            f"Paddy (eager) | {seconds / 60:.1f} min | | |")
    return rows


if __name__ == "__main__":
    rows = main(sys.argv[1:])
    print("\n".join(rows))
    if "--write" in sys.argv[1:]:
        from run_all import write_rows

        write_rows("8. GPU", rows)
