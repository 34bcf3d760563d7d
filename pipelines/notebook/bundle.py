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
# pure-Python libraries the dataset carries as wheels, for a Kaggle image with other versions (torch and
# torchvision, compiled, are Kaggle's own)
PINNED = ("timm", "fastai", "fastcore", "fasttransform")
_ZIP_TIME = (2020, 1, 1, 0, 0, 0)  # fixed: the same sources give the same wheel bytes, hence the same content hash


@dataclass
class Bundle:
    folder: Path    # the dataset's files, flat (the client uploads top-level files only)
    manifest: dict
    content: str    # the hash of what the files hold: the dataset version's identity

    @property
    def marker(self) -> str:
        """A file named by the content. Kaggle lists a dataset's file names and sizes, not their hashes, and
        retrained weights of one architecture keep their size (so does the manifest): the marker's name is what
        tells an old version from this content."""
        return f"ens-content-{self.content}.txt"

    def write_marker(self) -> None:
        path = self.folder / self.marker
        if not path.is_file():  # the same bytes whoever writes them; atomic, for a concurrent push of this content
            tmp = self.folder.parent / f".marker.{owner_tag()}"  # outside: the client uploads the folder's every file
            tmp.write_text(self.content + "\n")
            os.replace(tmp, path)

    @property
    def files(self) -> dict[str, int]:
        """{name: bytes} of every file the dataset must hold, the manifest and the content's marker included."""
        return {**self.manifest["files"], MANIFEST: (self.folder / MANIFEST).stat().st_size,
                self.marker: len(self.content) + 1}


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


def _wheel(dest_folder: Path, name: str, version: str, files: list[tuple[str, bytes]]) -> Path:
    """A pure-Python wheel (PEP 427) of `files` ((name in the wheel, bytes)), byte-for-byte the same for the same
    files, so that the dataset's content hash stays put. Importable straight from the file (zipimport)."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    path = dest_folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    records = []
    with zipfile.ZipFile(path, "w") as z:
        for arcname, data in [*files, (f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: "
                                                            f"{version}\n".encode()),
                              (f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: ens\nRoot-Is-Purelib: true\n"
                                                b"Tag: py3-none-any\n")]:
            z.writestr(zipfile.ZipInfo(arcname, _ZIP_TIME), data, compress_type=zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            records.append(f"{arcname},sha256={digest},{len(data)}")
        records.append(f"{info}/RECORD,,")
        z.writestr(zipfile.ZipInfo(f"{info}/RECORD", _ZIP_TIME), "\n".join(records) + "\n")
    return path


def write_wheel(dest_folder: Path) -> Path:
    """ens's modules as a wheel: the notebook puts it first on sys.path (no pip, no network). In it `pipelines` is
    a regular package (the sources' is a namespace package): first on sys.path, it wins over any other installed
    ens (zipimport gives no namespace portions)."""
    files = [("pipelines/__init__.py", b"")] + [(name, path.read_bytes()) for name, path in _package_files()]
    return _wheel(dest_folder, "ens", ens_version(), files)


def library_files(name: str) -> list[tuple[str, Path]] | None:
    """(name in a wheel, file) of the installed pure-Python distribution `name`'s modules and data, or None when it
    is not installed or has compiled parts (those cannot be imported from a wheel on sys.path)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(name)
    except PackageNotFoundError:
        return None
    out = []
    for f in dist.files or []:
        parts = f.parts
        if ".." in parts or "__pycache__" in parts or parts[0].endswith(".dist-info") or f.suffix == ".pyc":
            continue
        if f.suffix in (".so", ".pyd", ".dylib"):
            return None
        out.append((f.as_posix(), Path(dist.locate_file(f))))
    return sorted(out)


def write_library_wheel(dest_folder: Path, name: str) -> Path | None:
    """The installed library `name` (timm, fastai, ...) as a wheel, for a notebook whose image has another version."""
    from ..models import package_version

    files = library_files(name)
    if files is None:
        return None
    return _wheel(dest_folder, name, package_version(name), [(arcname, path.read_bytes()) for arcname, path in files])


def _manifest(g, chosen: Chosen, blend: dict) -> tuple[dict, list[tuple[str, Path]]]:
    """The manifest (without its file list) and the weight files it names: (name in the dataset, kept file)."""
    from ..models import package_version

    comp = g.competition.model_dump(mode="json")
    members, weights = [], []
    for i, o in enumerate(chosen.outcomes):
        models = []
        for j, unit in enumerate(o.predictors):
            name = f"m{i}-{o.member.name}-{j}.pth"
            models.append({"file": name, "sha256": unit.entry.model_sha256, "fold": unit.fold,
                           "normalize": unit.entry.meta["normalize"], "member": unit.entry.meta["member"]})
            weights.append((name, unit.entry.model_path))
        members.append({"name": o.member.name, "models": models})
    manifest = {"format": FORMAT, "ens": ens_version(), "sources": sources_digest(),
                "versions": {name: package_version(name) for name in LIBRARIES},
                "ensemble": chosen.name, "competition": {k: comp[k] for k in COMPETITION_FIELDS},
                "vocab": list(g.data.vocab), "probs": chosen.probs, "blend": blend, "members": members}
    return manifest, weights


def build(project: Project, g, chosen: Chosen) -> Bundle:
    """The dataset folder of `chosen` (members of the gathered ensemble `g`, weights kept) under
    cache/<competition>/notebook/<content>/: reused as it is when that content was built before. Besides the
    weights and ens, it carries the libraries of PINNED installed here, as wheels: the notebook imports them only
    where Kaggle's image has another version."""
    classical = [o.member.name for o in chosen.outcomes if o.member.classical]
    if classical:
        raise EnsError(f"classical member(s) {', '.join(classical)} keep no fitted classifier, so a notebook cannot "
                       "predict with them: leave them out of the ensemble you push")
    lacking = [o.member.name for o in chosen.outcomes if any(u.entry.model_path is None for u in o.predictors)]
    if lacking:
        raise EnsError(f"a notebook predicts with the members' weights, and {', '.join(lacking)} kept none: set "
                       "keep_model: true (e.g. `defaults.keep_model=true`) and run again (they are retrained once)")
    manifest, weights = _manifest(g, chosen, notebook_blend(g, chosen))
    from ..models import package_version

    manifest["pinned"] = {name: package_version(name) for name in PINNED if library_files(name) is not None}
    content = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    manifest["content"] = content
    parent = project.cache / g.competition.name / "notebook"
    folder = parent / content / "dataset"
    if (folder / MANIFEST).is_file():
        return _marked(Bundle(folder, json.loads((folder / MANIFEST).read_text()), content))
    parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(parent / content, [".dataset.{owner}"])
    tmp = parent / content / f".dataset.{owner_tag()}"
    tmp.mkdir(parents=True)
    try:
        for name, source in weights:
            _link_or_copy(source, tmp / name)
        write_wheel(tmp)
        manifest["pinned"] = {name: {"version": version, "wheel": write_library_wheel(tmp, name).name}
                              for name, version in manifest["pinned"].items()}
        manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}  # and the manifest itself
        write_json(tmp / MANIFEST, manifest, indent=1)
        os.replace(tmp, folder)
    except OSError as e:  # a concurrent push of the same content may have won the rename: then use its folder
        if not folder.is_dir():
            raise EnsError(f"cannot write the notebook's dataset under {project.relative(parent)}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _marked(Bundle(folder, json.loads((folder / MANIFEST).read_text()), content))


def _marked(bundle: Bundle) -> Bundle:
    bundle.write_marker()  # (also in a folder built before markers were)
    return bundle


def _link_or_copy(source: Path, dest: Path) -> None:
    try:
        os.link(source, dest)  # the weights are not copied: the cache's file is the dataset's
    except OSError:
        shutil.copy2(source, dest)
