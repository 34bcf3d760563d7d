"""A training notebook's dataset (ens as a wheel, the pinned libraries, the YAMLs, the units with their keys,
the checkpoints of units to resume) and its script kernel; both named by the dataset's content."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..config import Competition, Project
from ..config.loading import apply_overrides, read_yaml
from ..errors import EnsError
from ..notebook import bundle as notebook_bundle
from ..util import owner_tag, sweep_dead, write_json
from .gpus import Target

MANIFEST = "ens-train-manifest.json"
FORMAT = 1
SCRIPT = "ens_train.py"
STATUS = "ens-run.json"  # the notebook's account of its units, rewritten as each one ends


@dataclass
class Bundle:
    folder: Path
    manifest: dict
    content: str

    @property
    def files(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in sorted(self.folder.iterdir()) if p.is_file()}


def slugs(comp: Competition, content: str) -> tuple[str, str]:
    """(dataset slug, kernel slug) of one notebook: named by content, so two notebooks never share either."""
    base = "".join(c if c.isalnum() else "-" for c in comp.name.lower()).strip("-")[:20].strip("-")
    return f"ens-{base}-units-{content[:12]}", f"ens-{base}-train-{content[:12]}"


def _competition(comp: Competition) -> dict:
    """The competition as the notebook reads it: its data is wherever Kaggle mounts it (found there)."""
    return comp.model_dump(mode="json", exclude={"data_dir", "builtin"})


def build(project: Project, comp: Competition, path: Path, overrides: list[str], units: list[dict],
          target: Target, seconds: float) -> Bundle:
    """The dataset folder under cache/<competition>/remote/<content>/dataset (reused when built before). `units`:
    {label, member, fold, train, key, parts}; `seconds`: the notebook's own deadline. The checkpoint of a unit
    stopped by an earlier notebook's limit (`.partial-<train key>/`) travels with it, to resume there."""
    from ..cache import MemberCache
    from ..models import package_version

    cache = MemberCache(project.cache, comp.name)
    raw = apply_overrides(read_yaml(path), list(overrides))
    partials = {u["train"]: f"partial-{u['train']}.zip" for u in units if (cache.partial(u["train"])).is_dir()}
    manifest = {"format": FORMAT, "kind": "ens-train", "ens": notebook_bundle.ens_version(),
                "sources": notebook_bundle.sources_digest(),
                "versions": {name: package_version(name) for name in notebook_bundle.LIBRARIES},
                "pinned": {n: package_version(n) for n in notebook_bundle.PINNED
                           if notebook_bundle.library_files(n) is not None},
                "competition": _competition(comp), "ensemble_file": f"ensembles/{comp.name}/{path.name}",
                "ensemble": raw, "gpu": target.gpu.kind, "seconds": round(seconds), "units": units,
                "partials": {t: {"file": f, "sha256": _folder_digest(cache.partial(t))} for t, f in partials.items()}}
    content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    manifest["content"] = content
    parent = project.cache / comp.name / "remote"
    folder = parent / content / "dataset"
    if (folder / MANIFEST).is_file():
        return Bundle(folder, json.loads((folder / MANIFEST).read_text()), content)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(parent / content, [".dataset.{owner}"])
    tmp = parent / content / f".dataset.{owner_tag()}"
    tmp.mkdir(parents=True)
    try:
        notebook_bundle.write_wheel(tmp)
        manifest["pinned"] = {n: {"version": v, "wheel": notebook_bundle.write_library_wheel(tmp, n).name}
                              for n, v in manifest["pinned"].items()}
        for train, name in partials.items():
            zip_folder(cache.partial(train), tmp / name)
        write_json(tmp / MANIFEST, manifest, indent=1)
        os.replace(tmp, folder)
    except OSError as e:
        if not folder.is_dir():
            raise EnsError(f"cannot write the training notebook's dataset under {project.relative(parent)}: {e}") \
                from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(folder, json.loads((folder / MANIFEST).read_text()), content)


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(folder).as_posix().encode() + b"\0" + p.read_bytes())
    return digest.hexdigest()[:16]


def zip_folder(folder: Path, dest: Path, prefix: str = "") -> None:
    """The files of `folder` into the archive `dest` (under `prefix`/), written beside it and renamed into place:
    a reader (or a kill) never sees half an archive."""
    tmp = dest.with_name(f".{dest.name}.{owner_tag()}")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, f"{prefix}{p.relative_to(folder).as_posix()}")
    os.replace(tmp, dest)


_TEMPLATE = '''"""ens {version}: training {n} unit(s) of {ensemble} ({competition}) on a Kaggle {gpu}.

Generated by `ens run --on kaggle`; the dataset {dataset} (content {content}) holds ens, the YAMLs and the units.
Each finished unit is written to the output as it ends ({status} says which), each epoch's checkpoint too."""
import glob
import json
import os
import sys

ROOT = os.environ.get("ENS_KAGGLE_ROOT", "/kaggle")  # /kaggle on Kaggle; elsewhere a copy of its tree
CONTENT = "{content}"


def find_manifest():
    seen = []
    for pattern in ("input/*/{manifest}", "input/*/*/{manifest}", "input/*/*/*/{manifest}"):
        for path in sorted(glob.glob(os.path.join(ROOT, pattern))):
            with open(path) as f:
                content = json.load(f).get("content")
            if content == CONTENT:
                return path
            seen.append(f"{{path}} ({{content}})")
    sys.exit(f"ens: no dataset with content {{CONTENT}} is attached (found: {{seen or 'none'}})")


manifest_path = find_manifest()
folder = os.path.dirname(manifest_path)
with open(manifest_path) as f:
    manifest = json.load(f)
from importlib.metadata import PackageNotFoundError, version  # noqa: E402

for name, pin in manifest.get("pinned", {{}}).items():
    try:
        here = version(name)
    except PackageNotFoundError:
        here = None
    if here != pin["version"]:  # the version the units were planned with, from the dataset's wheel
        print(f"ens: {{name}} {{pin['version']}} from the dataset (this image has {{here or 'none'}})", flush=True)
        sys.path.insert(0, os.path.join(folder, pin["wheel"]))
sys.path.insert(0, glob.glob(os.path.join(folder, "ens-*.whl"))[0])  # ens itself, imported from the wheel
from pipelines.remote.kernel import main  # noqa: E402

main(manifest_path, ROOT)
'''


def write_kernel(folder: Path, comp: Competition, b: Bundle, owner: str, target: Target, ensemble: str) -> Path:
    """The kernel folder (script + kernel-metadata.json) of notebook owner/<kernel slug>."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset_slug, kernel_slug = slugs(comp, b.content)
    dataset = f"{owner}/{dataset_slug}"
    (folder / SCRIPT).write_text(_TEMPLATE.format(
        version=b.manifest["ens"], n=len(b.manifest["units"]), ensemble=ensemble, competition=comp.kaggle,
        gpu=target.gpu.kind, dataset=dataset, content=b.content, status=STATUS, manifest=MANIFEST))
    metadata = {"id": f"{owner}/{kernel_slug}", "title": kernel_slug, "code_file": SCRIPT, "language": "python",
                "kernel_type": "script", "is_private": True, "enable_gpu": target.gpu.machine_shape is not None,
                "enable_tpu": False, "enable_internet": target.internet,  # written out: the client's default is on
                "dataset_sources": [dataset], "competition_sources": [comp.kaggle], "kernel_sources": [],
                "model_sources": []}
    if target.gpu.machine_shape:  # always named: without it Kaggle may give a P100 (see docs/README)
        metadata["machine_shape"] = target.gpu.machine_shape
    (folder / "kernel-metadata.json").write_text(json.dumps(metadata, indent=1))
    return folder / SCRIPT
