"""7. Batching: inference time per image with a batch of 32 against a batch of 1 — the two columns `ens bench`
reports for a kept member — measured side by side, alternating, medians, 32 images per arm and round. The same
networks `ens run` trains (models.build_model, random weights: nothing downloaded): the digits members' 32 px
test_resnet and a 224 px resnet18 (a Paddy-sized member). On CPU and, when there is one, on CUDA. This was an
assertion in tests/test_evaluate.py, where a loaded machine could break it: a timing comparison is a benchmark,
not a test."""

import time

from common import median

CASES = [("test_resnet", 32), ("resnet18", 224)]
BATCH = 32


def ms_per_image(model, x, calls: int) -> float:
    """Like evaluate._ms_per_image, and waiting for the device at both ends (CUDA runs asynchronously)."""
    import torch

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        model(x)  # warm-up
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
        sync()
    return (time.perf_counter() - start) / calls / len(x) * 1000


def measure(arch: str, size: int, device: str, repeats: int = 3, images: int = 32) -> tuple[float, float]:
    """(ms per image at batch 1, ms per image at batch BATCH), medians of `repeats` alternating rounds."""
    import torch

    from pipelines.models import build_model

    model = build_model(arch, 10, size).eval().to(device)
    one, many = torch.randn(1, 3, size, size, device=device), torch.randn(BATCH, 3, size, size, device=device)
    single, batched = [], []
    for _ in range(repeats):
        single.append(ms_per_image(model, one, images))
        batched.append(ms_per_image(model, many, images // BATCH))
    return median(single), median(batched)


def main() -> list[str]:
    import torch

    rows = []
    for device in ("cpu", "cuda"):
        for arch, size in CASES:
            what = f"| 7. batching: ms per image, batch {BATCH} / batch 1, {arch} at {size} px, {device}"
            if device == "cuda" and not torch.cuda.is_available():
                rows.append(f"{what} | skipped: no CUDA | | < 1 |")
                continue
            one, many = measure(arch, size, device)
            rows.append(f"{what} | {many:.3f} / {one:.3f} ms | **{many / one:.2f}** | < 1 |")
    return rows


if __name__ == "__main__":
    print("\n".join(main()))
