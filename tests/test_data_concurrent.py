"""Two first runs at once: one builds (the digits data, a Kaggle download, a prepared copy), the other waits and
uses it; leftovers of dead processes are swept."""

import io
import multiprocessing
import os
import subprocess
import sys
import zipfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest
from conftest import make_project

from pipelines import data as data_module
from pipelines import kaggle
from pipelines.config import Prepare, Project, load_competition
from pipelines.data import ensure_data, load_data, prepare_data
from pipelines.util import sweep_dead

FORK = multiprocessing.get_context("fork")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _in_two_processes(work, *args) -> list[dict]:
    """`work(*args)` in two forked processes released at the same moment; each one's result, inode of what it
    got, stderr, or error."""
    barrier, results = FORK.Barrier(2), FORK.Queue()

    def child(n):
        stderr = io.StringIO()
        try:
            barrier.wait(timeout=60)
            with redirect_stderr(stderr):
                path = Path(work(*args))
            out = {"path": str(path), "inode": path.stat().st_ino, "files": sum(1 for _ in path.rglob("*"))}
        except BaseException as e:  # noqa: BLE001 - reported to the test
            out = {"error": f"{type(e).__name__}: {e}"}
        results.put(dict(out, n=n, stderr=stderr.getvalue()))

    procs = [FORK.Process(target=child, args=(n,)) for n in range(2)]
    for p in procs:
        p.start()
    out = [results.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    return sorted(out, key=lambda r: r["n"])


def _slowly(build):
    """`build`, one second slower: the other process surely comes while this one builds, however loaded the
    machine (monkeypatched before the fork, so both processes have it)."""
    def slow(*args, **kwargs):
        import time

        time.sleep(1.0)
        return build(*args, **kwargs)
    return slow


def _assert_one_built_one_waited(results, dest: Path):
    assert all("error" not in r for r in results), results
    assert {r["path"] for r in results} == {str(dest)}
    # both got the folder that stays: neither one replaced the other's under its feet
    assert {r["inode"] for r in results} == {dest.stat().st_ino}, results
    assert results[0]["files"] == results[1]["files"] > 0
    assert sum("waiting for another ens run building" in r["stderr"] for r in results) == 1, results


def test_two_first_runs_build_the_digits_data_once(tmp_path, digits_data, monkeypatch):
    monkeypatch.setitem(data_module.BUILDERS, "digits", _slowly(data_module.build_digits))
    data = tmp_path / "data" / "digits"
    root = make_project(tmp_path / "p", data)  # builtin digits, built on first use into `data`
    comp = load_competition(Project(root), "digits")
    dead = _dead_pid()
    stale = data.parent / f"digits.building-{dead}"
    (stale / "train_images").mkdir(parents=True)  # a build killed half-way
    live = data.parent / f"digits.building-{os.getpid()}"  # a live process's: not ours to remove
    live.mkdir()
    results = _in_two_processes(ensure_data, Project(root), comp)
    _assert_one_built_one_waited(results, data)
    assert sorted(p.name for p in data.parent.iterdir()) == ["digits", live.name]  # no lock file among the data
    assert results[0]["files"] == sum(1 for _ in digits_data.rglob("*"))


def test_two_first_runs_download_the_kaggle_data_once(tmp_path, monkeypatch):
    calls = tmp_path / "calls"

    def fake_call(op, args, timeout, doing, slug, progress_dir=None):  # the client's download, slowly
        import time

        with open(calls, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        with zipfile.ZipFile(Path(args["folder"]) / "comp.zip", "w") as z:
            for i in range(50):
                z.writestr(f"train_images/a/{i}.png", "PNG")
            z.writestr("sample_submission.csv", "image_id,label\n")
        return []

    monkeypatch.setattr(kaggle.client, "_call", fake_call)  # inherited by the forked processes
    dest = tmp_path / "data" / "comp"
    dest.parent.mkdir()
    stale = dest.parent / f".comp.partial-download-{_dead_pid()}-0123abcd"
    stale.mkdir()
    results = _in_two_processes(kaggle.download, "some-comp", dest)
    _assert_one_built_one_waited(results, dest)
    assert len(calls.read_text().split()) == 1  # downloaded once
    assert sorted(p.name for p in dest.parent.iterdir()) == ["comp"]


def test_two_runs_prepare_one_copy_and_sweep_dead_leftovers(project, monkeypatch):
    monkeypatch.setattr(data_module, "_build_prepared", _slowly(data_module._build_prepared))
    proj = Project(project)
    data = load_data(proj, load_competition(proj, "digits"))
    folder = project / "cache" / "prepared" / "digits"
    folder.mkdir(parents=True)
    dead = _dead_pid()
    (folder / f"max16-0123456789abcdef.building-{dead}").mkdir()  # a killed build of another copy
    (folder / f"max16-0123456789abcdef.tmp{dead}-5").write_text("")
    results = _in_two_processes(lambda: prepare_data(data, Prepare(max_size=16), proj.cache).root)
    copies = [p for p in folder.iterdir() if not p.name.endswith(".lock")]
    assert len(copies) == 1 and copies[0].name.startswith("max16-"), copies
    _assert_one_built_one_waited(results, copies[0])
    assert results[0]["files"] == sum(1 for _ in (data.root / "train_images").rglob("*")) + \
        sum(1 for _ in (data.root / "test_images").rglob("*")) + 2  # + the two top folders


def test_sweep_dead_removes_only_dead_processes_leftovers(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    names = [f".model-abc.tmp{dead}-77.pth", f".model-abc.tmp{live}-78.pth", f"x.building-{dead}",
             f"x.building-{live}", "x.building-notapid", f"y.tmp{dead}-1", "keep.pth"]
    for name in names:
        (tmp_path / name).write_text("")
    (tmp_path / f"d.building-{dead}" / "sub").mkdir(parents=True)
    removed = sweep_dead(tmp_path, [".model-*.tmp{owner}-*", "*.building-{owner}"])
    assert sorted(p.name for p in removed) == sorted([f".model-abc.tmp{dead}-77.pth", f"x.building-{dead}",
                                                      f"d.building-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".model-abc.tmp{live}-78.pth", f"x.building-{live}", "x.building-notapid", f"y.tmp{dead}-1", "keep.pth"])
    with pytest.raises(ValueError):
        sweep_dead(tmp_path, ["*.tmp*"])


def test_sweep_dead_takes_only_this_hosts_leftovers(tmp_path):
    """On a filesystem shared by several hosts (a Ray cluster's project folder) a pid says nothing about another
    host's process: names carry host, pid and a random part, and only this host's dead ones are swept."""
    from pipelines.util import _host, owner_tag

    dead = _dead_pid()
    mine = owner_tag()
    assert mine.startswith(f"{_host()}~{os.getpid()}~") and mine != owner_tag()  # random part: two calls differ
    names = {f"a.building-{_host()}~{dead}~0badcafe": False,  # this host, dead: swept
             f"b.building-otherhost~{dead}~0badcafe": True,  # another host's (its pid may be alive there): kept
             f"c.building-{mine}": True,  # this process: kept
             f"d.building-{dead}": False}  # an older ens version's bare pid: this host's, dead: swept
    for name in names:
        (tmp_path / name).mkdir()
    sweep_dead(tmp_path, ["*.building-{owner}"])
    assert {p.name for p in tmp_path.iterdir()} == {n for n, kept in names.items() if kept}
