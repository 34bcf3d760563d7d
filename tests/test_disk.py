"""The cache and the disk (issue 24, items 16-21): a replaced image is seen, a full disk is the one-line disk-full
error on a real small filesystem (a tmpfs, mounted where the tests run as root) and leaves nothing half-built,
leftovers can be listed and pruned, member names stay file names.

The tmpfs tests skip, saying why, where mounting is not possible (not root, or no permission in a container)."""

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import ens, make_project
from pipelines.config import Project, load_competition
from pipelines.errors import EnsError


def _digits(tmp_path, digits_data, ensembles=None, copy=False):
    data = digits_data
    if copy:
        data = tmp_path / "digits"
        shutil.copytree(digits_data, data)
    proj = Project(make_project(tmp_path / "p", data, ensembles))
    return proj, load_competition(proj, "digits"), data


# --------------------------------------------------------------------------------------------- 16
def test_an_image_replaced_with_its_mtime_restored_changes_the_fingerprint(tmp_path, digits_data):
    """`cp -p`, `rsync -t`, tar and unzip restore the mtime: a same-size replacement must still be seen. Data copied
    elsewhere (new inodes and ctimes, same content) keeps its fingerprint: the signature only decides re-hashing."""
    from pipelines.data import load_data

    proj, comp, data = _digits(tmp_path, digits_data, copy=True)
    first = load_data(proj, comp).fingerprint
    by_size: dict = {}
    for image in sorted(data.glob("test_images/*.png")):
        by_size.setdefault(image.stat().st_size, []).append(image)
    victim, other = next(pair for pair in by_size.values() if len(pair) > 1 and
                         pair[0].read_bytes() != pair[1].read_bytes())[:2]
    before = victim.stat()
    victim.write_bytes(other.read_bytes())  # in place, as `cp` does: same inode, same size
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert load_data(proj, comp).fingerprint != first

    victim.write_bytes(Path(digits_data, victim.relative_to(data)).read_bytes())  # the original back
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # re-extracted elsewhere: every signature differs, the content does not
    proj2 = Project(make_project(tmp_path / "p2", moved))
    assert load_data(proj2, load_competition(proj2, "digits")).fingerprint == first


# --------------------------------------------------------------------------------------------- 17
def test_a_prepared_copy_on_a_full_disk_is_the_disk_full_error_and_is_never_kept(tmp_path, digits_data, small_disk):
    from pipelines.config import Prepare
    from pipelines.data import load_data, prepare_data

    proj, comp, _ = _digits(tmp_path, digits_data)
    data = load_data(proj, comp)
    cache = small_disk(tmp_path / "small", "1m")  # 1797 small PNGs take a 4 KiB page each: 7 MiB
    with pytest.raises(EnsError) as e:
        prepare_data(data, Prepare(max_size=16), cache)
    assert "disk is full" in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not [p for p in (cache / "prepared" / "digits").iterdir() if not p.name.endswith(".lock")]

    # a copy an older version left with empty images is not reused: it is built again
    roomy = tmp_path / "roomy"
    built = prepare_data(data, Prepare(max_size=16), roomy).root
    (built / data.train_paths[0]).write_bytes(b"")
    again = prepare_data(data, Prepare(max_size=16), roomy).root
    assert again == built and (again / data.train_paths[0]).stat().st_size > 0


# --------------------------------------------------------------------------------------------- 18
def test_a_decoded_copy_on_a_full_disk_is_the_disk_full_error(tmp_path, digits_data, small_disk):
    """A sparse memmap on a full disk dies of SIGBUS (in a worker: BrokenProcessPool): run in a child process, so
    that the old code's death is a failed assertion here and not the test run's."""
    cache = small_disk(tmp_path / "small", "2m")  # the copy at 32x32: 1797 x 3 KiB = 5.3 MiB
    proj, _, _ = _digits(tmp_path, digits_data)
    script = textwrap.dedent(f"""
        from dataclasses import replace
        from pathlib import Path
        from pipelines.config import Project, load_competition
        from pipelines.data import load_data
        from pipelines.data.decoded import decoded_images
        from pipelines.errors import EnsError
        proj = Project(Path({str(proj.root)!r}))
        data = replace(load_data(proj, load_competition(proj, "digits")), cache_root=Path({str(cache)!r}))
        try:
            decoded_images(data, (32, 32), say=print)
        except EnsError as e:
            print("ERROR", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ERROR the disk is full while writing a decoded copy" in done.stdout, done.stdout + done.stderr[-2000:]
    assert not [p for p in (cache / "decoded" / "digits").iterdir() if not p.name.endswith(".lock")]


# --------------------------------------------------------------------------------------------- 19
def test_kept_weights_on_a_full_disk_are_the_disk_full_error_and_leave_no_temporary(tmp_path, small_disk):
    """torch.save given a path says "enforce fail at inline_container.cc" (a RuntimeError) on a full disk."""
    import torch

    from pipelines.cache import MemberCache

    cache = MemberCache(small_disk(tmp_path / "small", "1m"), "digits")
    with pytest.raises(EnsError) as e:
        cache.save_model("k" * 20, {"w": torch.zeros(1 << 20)}, {"normalize": None})  # 4 MiB
    assert "disk is full while writing the weights of kkkk" in str(e.value) and "\n" not in str(e.value)
    assert not list((cache.root / "models").iterdir())
    cache.save_model("k" * 20, {"w": torch.zeros(1000)}, {})  # room for small weights: written as ever
    assert torch.load(cache.model_file("k" * 20))["w"].shape == (1000,)


# --------------------------------------------------------------------------------------------- 20
ONE = """\
competition: digits
defaults: {pretrained: false, size: 32, epochs: 1, num_workers: 0, tta: {n: 0}}
members:
  - {name: resnet, arch: test_resnet, decode: true}
"""


def _hold(lock: Path, shared: bool = False):
    """A child process holding `lock` as a running ens does (flock; `shared`: as a run holds the cache), until
    killed."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    code = (f"import fcntl, os, time; fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT); "
            f"fcntl.flock(fd, fcntl.{'LOCK_SH' if shared else 'LOCK_EX'}); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def _write(path: Path, size: int = 1000, meta: str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "blob").write_bytes(b"x" * size)
    if meta is not None:
        (path / "meta.json").write_text(meta)
    return path


def test_cache_prune_lists_then_deletes_only_leftovers_and_never_what_a_run_holds(tmp_path, digits_data):
    import json

    from pipelines.cache import MemberCache, prediction_key, train_key
    from pipelines.config import load_ensemble
    from pipelines.data import load_data
    from pipelines.data.decoded import decoded_folder

    proj, comp, _ = _digits(tmp_path, digits_data, {"two": ONE + "  - {name: effnet, arch: test_efficientnet}\n"})
    data = load_data(proj, comp)
    member, other = load_ensemble(proj, "digits/two.yaml")[1].members
    train = train_key(member, data.fingerprint)
    key = prediction_key(train, member)
    cache = MemberCache(proj.cache, "digits")
    used_entry = _write(cache.path(key), meta=json.dumps({"key": key, "train_key": train}))
    old_entry = _write(cache.path("0ld"), meta=json.dumps({"key": "0ld", "train_key": "0ldtrain"}))
    done_partial = _write(cache.partial("0ldtrain"), 2_000_000)  # its entry exists
    orphan = _write(cache.partial("edited"), 3_000_000)  # no YAML trains it any more
    running = _write(cache.partial("running"), 1000)  # orphaned too, but a running ens holds its lock
    needed = _write(cache.partial(train_key(other, data.fingerprint)))  # interrupted, no entry: a rerun resumes
    damaged = _write(cache.root / ".damaged" / "abc-1700000000")
    used_copy = _write(decoded_folder(data, (32, 32)))
    old_copy = _write(decoded_folder(data, (64, 64)), 4_000_000)
    notebooks = [_write(cache.root / "notebook" / c / "dataset", 500_000, json.dumps({"ensemble": "one"})).parent
                 for c in ("older", "newest")]
    for notebook in notebooks:
        (notebook / "dataset" / "meta.json").rename(notebook / "dataset" / "manifest.json")
    os.utime(notebooks[0] / "dataset" / "manifest.json", (1e9, 1e9))
    holder = _hold(cache.lock("running"))
    try:
        dry = ens("cache", "prune", cwd=proj.root)
        assert dry.returncode == 0, dry.stderr
        for path in (done_partial, orphan, running, damaged, old_copy, notebooks[0]):
            assert path.name in dry.stdout, dry.stdout
        assert notebooks[1].name not in dry.stdout and "would free 9.5 MB" in dry.stdout and "in use by a running ens" in dry.stdout, dry.stdout
        assert all(p.exists() for p in (done_partial, orphan, running, damaged, old_copy, old_entry))  # a dry run

        done = ens("cache", "prune", "--yes", cwd=proj.root)
        assert done.returncode == 0 and "freed 9.5 MB" in done.stdout, done.stdout + done.stderr
        assert not any(p.exists() for p in (done_partial, orphan, damaged, old_copy, notebooks[0]))
        assert [p.name for p in (running, needed, used_copy, used_entry, old_entry, notebooks[1])
                if not p.exists()] == [], done.stdout

        ens("cache", "prune", "--yes", "--entries", cwd=proj.root)
        assert not old_entry.exists() and used_entry.exists() and running.exists() and notebooks[1].exists()
    finally:
        holder.kill()
        holder.wait()
    assert ens("cache", "prune", "--yes", cwd=proj.root).returncode == 0 and not running.exists()



def test_cache_prune_deletes_no_copy_or_entry_while_a_run_uses_the_cache(tmp_path, digits_data):
    """A review deleted the decoded copy a running `ens run` (of overrides no YAML names) was reading, and the
    finished entries of such a run: every run holds the cache in use (shared) while it reads or writes it, and
    copies, entries and kept weights go only when prune can take that lock alone. Partial leftovers still go."""
    import json

    from pipelines.cache import MemberCache
    from pipelines.data import load_data
    from pipelines.data.decoded import decoded_folder
    from pipelines.util import in_use_lock

    proj, comp, _ = _digits(tmp_path, digits_data, {"one": ONE})
    data = load_data(proj, comp)
    cache = MemberCache(proj.cache, "digits")
    read_copy = _write(decoded_folder(data, (40, 40)), 1000)  # no YAML's member reads it: a run with overrides does
    their_entry = _write(cache.path("0verride"), meta=json.dumps({"key": "0verride", "train_key": "0vtrain"}))
    done_partial = _write(cache.partial("0vtrain"), 1000)
    holder = _hold(in_use_lock(proj.cache), shared=True)
    try:
        out = ens("cache", "prune", "--yes", "--entries", cwd=proj.root)
        assert out.returncode == 0, out.stderr
        assert read_copy.exists() and their_entry.exists() and not done_partial.exists(), out.stdout
        assert "in use by a running ens" in out.stdout, out.stdout
    finally:
        holder.kill()
        holder.wait()
    out = ens("cache", "prune", "--yes", "--entries", cwd=proj.root)
    assert not read_copy.exists() and not their_entry.exists(), out.stdout


# --------------------------------------------------------------------------------------------- 21
@pytest.mark.parametrize("name", ["../../x", "a/b", ".hidden", "with space"])
def test_a_member_name_that_is_no_plain_file_name_is_one_line(tmp_path, digits_data, name):
    proj, _, _ = _digits(tmp_path, digits_data, {"bad": ONE.replace("name: resnet", f"name: '{name}'")})
    result = ens("validate", "digits/bad.yaml", cwd=proj.root)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "members[0].name" in result.stderr, result.stderr
    assert "a member name is letters, digits" in result.stderr


def test_cache_prune_keeps_what_a_gpu_trained_under_its_own_precision(tmp_path, digits_data):
    """`--on kaggle` (or a shared cache) brings back units keyed at the GPU's precision (fp16 on a T4): prune
    resolved keys with this machine's only and listed them, their checkpoints included, as unused (a review)."""
    import json

    from pipelines.cache import MemberCache, prediction_key, train_key
    from pipelines.config import load_ensemble
    from pipelines.data import load_data
    from pipelines.device import assumed

    proj, comp, _ = _digits(tmp_path, digits_data, {"one": ONE.replace("name: resnet", "name: resnet, precision: auto")})
    data = load_data(proj, comp)
    member = load_ensemble(proj, "digits/one.yaml")[1].members[0]
    with assumed({"cuda": True, "bf16": False}):
        train = train_key(member, data.fingerprint)
        key = prediction_key(train, member)
    assert train != train_key(member, data.fingerprint)  # fp16 there, fp32 here
    cache = MemberCache(proj.cache, "digits")
    entry = _write(cache.path(key), meta=json.dumps({"key": key, "train_key": train}))
    weights = _write(cache.model_dir(train))
    out = ens("cache", "prune", "--entries", cwd=proj.root)
    assert out.returncode == 0, out.stderr
    assert entry.name not in out.stdout and weights.name not in out.stdout, out.stdout
    shutil.rmtree(entry)
    shutil.rmtree(weights)
    control = _write(cache.partial("0ther"))  # no YAML trains it
    kaggle_partial = _write(cache.partial(train))  # what the next notebook resumes from
    out = ens("cache", "prune", cwd=proj.root)
    assert control.name in out.stdout and kaggle_partial.name not in out.stdout, out.stdout
