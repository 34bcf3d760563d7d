"""The Kaggle dataset a notebook predicts with: kept weights, a manifest, ens as a wheel; content-addressed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..config import Project
from ..errors import EnsError
from ..util import owner_tag, sweep_dead, write_json

MANIFEST = "ens-manifest.json"
FORMAT = 1
# the competition fields the notebook needs to find, read and write its data (not the training layout)
COMPETITION_FIELDS = ("name", "kaggle", "test_images", "test_id", "image_extensions", "sample_submission",
                      "id_column", "target_column", "submission_kind", "positive_class", "metric", "notebook")
LIBRARIES = ("torch", "torchvision", "timm", "fastai", "numpy", "pydantic")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed: the same sources give the same wheel bytes, hence the same content hash


@dataclass
class Bundle:
    folder: Path    # the dataset's files, flat (the client uploads top-level files only)
    manifest: dict
    content: str    # the hash of what the files hold: the dataset version's identity

    @property
    def files(self) -> dict[str, int]:
        """{name: bytes} of every file the dataset must hold, the manifest included."""
        return {**self.manifest["files"], MANIFEST: (self.folder / MANIFEST).stat().st_size}


@dataclass
class Chosen:
    """What a notebook predicts with, as `run.blend_and_submit` blends it: the members' outcomes (weights kept),
    their weights, the blend (config.Combine), the probabilities' kind ('tta' or 'plain') and a name."""

    name: str
    outcomes: list
    weights: list[float]
    combine: object
    probs: str


def notebook_blend(g, chosen: Chosen) -> dict:
    """How the notebook blends its members' test probabilities, as `ens run` does: a fixed blend with the chosen
    weights, or a learned one's weights (greedy, hill climbing), fitted on the cached validation probabilities as
    `ens run` fitted them. Stacking's fitted model is not carried: refused."""
    from .. import ensemble

    combine, weights = chosen.combine, list(chosen.weights)
    if combine.method == "stack":
        raise EnsError(f"{g.path.name}: combine: stack is not available in a notebook yet (its fitted model is not "
                       "exported); use mean, power, rank, greedy or hill_climb for a code competition")
    if not combine.learned:
        return {"method": combine.method, "power": combine.power, "weights": weights}
    targets = chosen.outcomes[0].entry.arrays["valid_targets"]
    blended = ensemble.blend(combine, [o.entry.probs("valid", chosen.probs) for o in chosen.outcomes],
                             [o.entry.probs("test", chosen.probs) for o in chosen.outcomes], targets, weights,
                             g.blend_folds(), g.competition.metric)
    return {"method": "weights", "power": combine.power, "weights": [float(w) for w in blended.weights]}


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _package_files() -> list[tuple[str, Path]]:
    """(name in the wheel, file) of every module of ens (the `pipelines` package), sorted."""
    root = Path(__file__).resolve().parents[1]
    return sorted((f"pipelines/{p.relative_to(root).as_posix()}", p) for p in root.rglob("*.py")
                  if "__pycache__" not in p.parts)


def ens_version() -> str:
    from ..models import package_version

    v = package_version("ens")
    return "0.0.0" if v == "none" else v


def sources_digest() -> str:
    digest = hashlib.sha256()
    for name, path in _package_files():
        digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def write_wheel(dest_folder: Path) -> Path:
    """ens's modules as a pure-Python wheel (PEP 427), byte-for-byte the same for the same sources, so that the
    dataset's content hash stays put. It is importable straight from the file (zipimport): the notebook puts it
    on sys.path, no pip and no network; `pip install --no-deps` takes it too."""
    version = ens_version()
    info = f"ens-{version}.dist-info"
    path = dest_folder / f"ens-{version}-py3-none-any.whl"
    records = []

    def add(z: zipfile.ZipFile, name: str, data: bytes) -> None:
        z.writestr(zipfile.ZipInfo(name, _ZIP_TIME), data, compress_type=zipfile.ZIP_DEFLATED)
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        records.append(f"{name},sha256={digest},{len(data)}")

    with zipfile.ZipFile(path, "w") as z:
        # a regular package in the wheel (the sources' is a namespace package): first on sys.path, it wins over any
        # other installed ens (zipimport gives no namespace portions)
        add(z, "pipelines/__init__.py", b"")
        for name, file in _package_files():
            add(z, name, file.read_bytes())
        add(z, f"{info}/METADATA", f"Metadata-Version: 2.1\nName: ens\nVersion: {version}\n".encode())
        add(z, f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: ens\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        records.append(f"{info}/RECORD,,")
        z.writestr(zipfile.ZipInfo(f"{info}/RECORD", _ZIP_TIME), "\n".join(records) + "\n")
    return path


def _manifest(g, chosen: Chosen, blend: dict) -> tuple[dict, list[tuple[str, Path]]]:
    """The manifest (without its file list) and the weight files it names: (name in the dataset, kept file)."""
    from ..models import package_version

    comp = g.competition.model_dump(mode="json")
    members, weights = [], []
    for i, o in enumerate(chosen.outcomes):
        models = []
        for j, unit in enumerate(o.predictors):
            name = f"m{i}-{o.member.name}-{j}.pth"
            models.append({"file": name, "sha256": _sha256(unit.entry.model_path), "fold": unit.fold,
                           "normalize": unit.entry.meta["normalize"], "member": unit.entry.meta["member"]})
            weights.append((name, unit.entry.model_path))
        members.append({"name": o.member.name, "models": models})
    manifest = {"format": FORMAT, "ens": ens_version(), "sources": sources_digest(),
                "versions": {name: package_version(name) for name in LIBRARIES},
                "ensemble": chosen.name, "competition": {k: comp[k] for k in COMPETITION_FIELDS},
                "vocab": list(g.data.vocab), "probs": chosen.probs, "blend": blend, "members": members}
    return manifest, weights


def build(project: Project, g, chosen: Chosen, extra_wheels: list[Path] = ()) -> Bundle:
    """The dataset folder of `chosen` (members of the gathered ensemble `g`, weights kept) under
    cache/<competition>/notebook/<content>/: reused as it is when that content was built before. `extra_wheels`
    (e.g. pinned timm/fastai wheels that Kaggle's image lacks) join it; the notebook installs them offline."""
    classical = [o.member.name for o in chosen.outcomes if o.member.classical]
    if classical:
        raise EnsError(f"classical member(s) {', '.join(classical)} keep no fitted classifier, so a notebook cannot "
                       "predict with them: leave them out of the ensemble you push")
    lacking = [o.member.name for o in chosen.outcomes if any(u.entry.model_path is None for u in o.predictors)]
    if lacking:
        raise EnsError(f"a notebook predicts with the members' weights, and {', '.join(lacking)} kept none: set "
                       "keep_model: true (e.g. `defaults.keep_model=true`) and run again (they are retrained once)")
    manifest, weights = _manifest(g, chosen, notebook_blend(g, chosen))
    for wheel in extra_wheels:
        if not Path(wheel).is_file() or not str(wheel).endswith(".whl"):
            raise EnsError(f"{wheel}: not a wheel file; give .whl files (e.g. from `pip download timm==X --no-deps`)")
    manifest["wheels"] = sorted(Path(w).name for w in extra_wheels)
    extras = {Path(w).name: _sha256(Path(w)) for w in extra_wheels}
    content = hashlib.sha256(json.dumps([manifest, extras], sort_keys=True).encode()).hexdigest()[:16]
    manifest["content"] = content
    parent = project.cache / g.competition.name / "notebook"
    folder = parent / content / "dataset"
    if (folder / MANIFEST).is_file():
        return Bundle(folder, json.loads((folder / MANIFEST).read_text()), content)
    parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(parent / content, [".dataset.{owner}"])
    tmp = parent / content / f".dataset.{owner_tag()}"
    tmp.mkdir(parents=True)
    try:
        for name, source in weights:
            _link_or_copy(source, tmp / name)
        for wheel in extra_wheels:
            shutil.copy2(wheel, tmp / Path(wheel).name)
        write_wheel(tmp)
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}  # and the manifest itself
        write_json(tmp / MANIFEST, manifest, indent=1)
        os.replace(tmp, folder)
    except OSError as e:  # a concurrent push of the same content may have won the rename: then use its folder
        if not folder.is_dir():
            raise EnsError(f"cannot write the notebook's dataset under {project.relative(parent)}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Bundle(folder, json.loads((folder / MANIFEST).read_text()), content)


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)  # the weights are not copied: the cache's file is the dataset's
    except OSError:
        shutil.copy2(source, dest)
