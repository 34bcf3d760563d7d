"""`ens plan ENSEMBLE`: a dry run. Per member: cached or to train, stages, batch (and on CUDA the micro-batch and
accumulation that fit its `gpu_memory`), parameters, FLOPs per image, and an estimated time. Nothing is trained
and no cache entry is written (only the data fingerprint memo, as by every command that reads the data).

Parameters and FLOPs are counted on the network `build_learner` trains (fastai body and head, random weights:
nothing is downloaded), with torch's FlopCounterMode on a forward pass of one image at each stage size, and
memoised per (arch, build size, classes) and library versions in ~/.cache/ens/, so a second plan builds nothing.
The networks are built on torch's meta device (no weights allocated or initialised, shapes computed without the
arithmetic; attention counted as the matrix products it is, which the CPU's fused kernel hides from the counter),
and a convnet, which takes no size argument, once for all the members of its arch.

The time estimate is a rate fitted on what was trained before: every cached member of the same competition on the
same device gives seconds per (image · forward GFLOP) of training work,

    work = training images × (Σ_stages epochs × GFLOPs(stage size) + frozen epochs × GFLOPs(first size))

(prediction likewise: (TTA passes + 1) × (validation + test images) × GFLOPs(final size)). Members with the same
arch pool only their own entries (the FLOP rate differs a lot between architectures: attention vs. convolutions,
data loading that dominates tiny models); other members pool all entries on the device. A rough guide, no more:
it knows nothing of batch size, workers or precision beyond what the measured entries had.

A cross-validated ensemble (`validation: cv`) is planned members × folds: each fold model (and the refit of
`refit: full`) is its own cache entry, cached or to train, estimated on its own training images (all but its
fold's; the refit's: all); a member's time is the sum over the fold models still to compute.

Progressive resizing (`stages:`) is costed against the same member trained every epoch at its final size: the
training work above for both, its ratio the FLOPs saved (per member, and for the ensemble).

Members with `decode: true` read uint8 copies of the training and test images decoded once per pre-size
(`Member.presizes`): the plan gives their disk, (training + test images) × h × w × 3 bytes per copy, each copy
counted once (every member and fold at that pre-size, reading the same originals or prepared copy, shares it),
and the RAM training touches at once: the largest copy, read through the page cache as a memmap.

Before the data is downloaded the plan says what it can: members, stages, parameters and FLOPs (sized by the
competition's `expected: {classes}`, else counted with a 2-class head, a lower bound), FLOPs saved, and, given
`expected:` image counts, time estimates and the decoded copies' disk; whether a member is cached is unknown (its
cache key hashes the data). Nothing is downloaded.

Modules: `estimate` (parameters, FLOPs and the time estimate), `build` (the plan of an ensemble), `render` (its
tables).
"""

from .render import render  # noqa: F401
from ..data.decoded import decoded_bytes  # noqa: F401 - the plan prints it (tests import it from here)
from .build import (
    DecodedCopy,  # noqa: F401
    FoldPlan,  # noqa: F401
    MemberPlan,  # noqa: F401
    Plan,  # noqa: F401
    plan_ensemble,  # noqa: F401
)
from .estimate import (
    ModelStats,  # noqa: F401
    count_flops,  # noqa: F401
    flops_memo_path,  # noqa: F401
)
