"""Small helpers shared by modules that otherwise know nothing of each other (cache, data, kaggle, submission)."""

from __future__ import annotations

import errno
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional


def process_alive(pid: int) -> bool:
    """Is process `pid` still running? (Leftovers of a dead run may be swept; a live run's may not.)"""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextmanager
def file_lock(path: Path, on_wait: Optional[Callable[[], None]] = None, poll: float = 0.2) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) for the `with` block.

    `fcntl.flock` locks belong to the open file, so the kernel releases them when the holder dies (kill -9
    included): a stale lock file never blocks anyone, and nothing needs sweeping. When another process holds the
    lock, `on_wait()` is called once (to say so) and the lock is polled until it is free. Two `file_lock`s on
    one path in one process also exclude each other (each opens its own file description)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            if on_wait is not None:
                on_wait()
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as e2:
                    if e2.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    time.sleep(poll)  # polled, not blocking: Ctrl-C stays immediate
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a curious user
        yield
    finally:
        os.close(fd)  # releases the lock


def _die_with_parent(parent: int) -> None:
    """A pool worker's initializer: killed when the process that started it dies (Linux's PR_SET_PDEATHSIG).
    A forked worker inherits its parent's open files, lock files included: one that outlived a killed parent
    would hold the parent's lock, and every later run would wait for it forever."""
    if sys.platform == "linux":
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def process_pool(workers: int):
    """A ProcessPoolExecutor of `workers` forked workers (fork starts at once and re-imports nothing; spawn would
    re-run the main module, which fails for `python -` or a REPL) that die with this process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("fork" if sys.platform == "linux" else None)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_die_with_parent, initargs=(os.getpid(),))


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname()) or "host"


def owner_tag() -> str:
    """What names a temporary file or folder as this process's, unique on a filesystem shared by several hosts:
    `<host>~<pid>~<random>` (the host with anything but letters and digits as `_`). `sweep_dead` removes one only
    on its own host, once its pid is gone there: on a shared filesystem another node's live folder is never taken
    for a dead one (pids collide across hosts), and a pid reused later on one host never revives a dead name."""
    import secrets

    return f"{_host()}~{os.getpid()}~{secrets.token_hex(4)}"


def unique_suffix() -> str:
    """A temporary-file suffix no other process or thread uses at the same time: `.tmp<owner tag>`."""
    return f".tmp{owner_tag()}"


# an owner tag in a name: host~pid~random, or an older version's bare pid (or pid-nanoseconds, pid-random)
OWNER = r"(?:(?P<host>[A-Za-z0-9_]+)~(?P<pid>\d+)~[0-9a-f]+|(?P<pid_only>\d+)(?:-[0-9a-f]+)?)"


def sweep_dead(folder: Path, patterns) -> list[Path]:
    """Remove from `folder` the leftovers of processes that no longer run; the removed paths.

    Each pattern is an fnmatch pattern of names in which `{owner}` stands for the `owner_tag()` its writer put in
    the name: `"*.building-{owner}"`, `"*.tmp{owner}"` (`unique_suffix()` names). A match written on this host
    whose process is dead is deleted, file or folder (symbolic links as links); another host's, a live process's,
    and a name without an owner tag stay. Names of older ens versions (a bare pid, or `<pid>-<ns>`) count as this
    host's. Safe to call while other runs, on this host or others, work in `folder`: they only lose what is
    theirs when they are dead."""
    import fnmatch
    import re
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, host = [], _host()
    for pattern in patterns:
        if "{owner}" not in pattern:
            raise ValueError(f"sweep pattern {pattern!r} has no {{owner}}: without the writer's pid and host nothing "
                             "is safe to remove")
        regex = re.compile(fnmatch.translate(pattern.replace("{owner}", "\0")).replace("\0", OWNER))
        for path in folder.glob(pattern.replace("{owner}", "*")):
            match = regex.match(path.name)
            if not match or match["host"] not in (None, host) or process_alive(int(match["pid"] or match["pid_only"])):
                continue
            try:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:  # another run swept it first
                continue
            except OSError:
                shutil.rmtree(path, ignore_errors=True)
                if path.exists():
                    continue
            removed.append(path)
    return removed


def say(progress):
    """How a long verb tells the user something mid-run: above the rich progress display when there is one (a
    plain print would tear it), else on stderr."""
    import sys

    return progress.console.print if progress is not None else (lambda text: print(text, file=sys.stderr))


def user_cache() -> Path:
    """ens's own cache of facts about this machine and its libraries (not about a project): ~/.cache/ens."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "ens"


def write_json(path: Path, value, **dump_options) -> None:
    """`value` as JSON into `path`, atomically: a temporary sibling of this process's own, renamed over it, so a
    reader sees the old file or the new one and concurrent writers never share a temporary (a dead writer's is
    swept by the next one)."""
    import glob
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_dead(path.parent, [f"{glob.escape(path.name)}.tmp{{owner}}", f"{glob.escape(path.name)}.tmp{{owner}}-*",
                             f"{glob.escape(path.stem)}.tmp{{owner}}"])
    tmp = path.with_name(path.name + unique_suffix())
    tmp.write_text(json.dumps(value, **dump_options))
    os.replace(tmp, path)


def lock_file_for(dest: Path) -> Path:
    """The lock file of whoever builds `dest` (a data folder that may lie in the user's own folders, where ens
    leaves nothing but the data): in ens's user cache, named by `dest`'s absolute path."""
    import hashlib

    dest = Path(dest).absolute()
    digest = hashlib.sha256(str(dest).encode()).hexdigest()[:16]
    return user_cache() / "locks" / f"{dest.name}-{digest}.lock"


def spread(values) -> str:
    """'mean ± std' of per-fold scores (numpy's std: over the folds as they are, not a sample estimate); '' of none."""
    import numpy as np

    return f"{np.mean(values):.4f} ± {np.std(values):.4f}" if len(values) else ""


@contextmanager
def building(dest: Path, leftovers: list[str], lock: Path | None = None):
    """One builder of `dest` at a time, across processes: hold a lock file (`lock`, by default `.<name>.lock`
    beside `dest`; released by the kernel if the holder dies), saying on stderr when another run holds it, and
    sweep first what dead processes left in dest's folder (`leftovers`: util.sweep_dead patterns). Re-check
    `dest` inside: another run may have built it while this one waited."""
    def say():
        print(f"waiting for another ens run building {dest} ...", file=sys.stderr, flush=True)

    with file_lock(lock or dest.parent / f".{dest.name}.lock", on_wait=say):
        sweep_dead(dest.parent, leftovers)
        yield


_IMPORTED = time.monotonic()


def process_seconds() -> float:
    """Seconds since this process started (its start time in /proc, where there is one; else since ens was
    imported): what `ens run`'s start-up timings count imports from."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def read_csv_rows(path: Path) -> list[list[str]]:
    """A CSV's rows as lists of fields (the header first), read one way by every stage: UTF-8 with or without a
    byte-order mark (Excel writes one; left in, it sticks invisibly to the first column's name). A file that is
    not UTF-8 or not CSV is one line naming it, not a traceback; a missing file raises FileNotFoundError."""
    import csv

    from .errors import EnsError

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.reader(f))
    except UnicodeDecodeError as e:
        raise EnsError(f"{path}: not UTF-8 text (byte {e.start} is {e.object[e.start:e.start + 1]!r}); save it "
                       "as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None
    except csv.Error as e:
        raise EnsError(f"{path}: not a readable CSV ({e}); fix the file") from None


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(columns, rows as column → text) of a CSV read by `read_csv_rows`; a short row's missing cells are ''."""
    header, *rows = read_csv_rows(path) or [[]]
    return header, [dict(zip(header, row + [""] * (len(header) - len(row)))) for row in rows if row]


def in_use_lock(cache_root: Path) -> Path:
    """The lock every process using a project's cache holds shared (`cache_in_use`); `ens cache prune` deletes
    what a run may read (copies, entries, kept weights) only when it can take it exclusively."""
    return Path(cache_root) / ".in-use.lock"


@contextmanager
def cache_in_use(cache_root: Path):
    """Hold the project's cache shared for the block: a prune waits for no run but deletes nothing a run reads."""
    import fcntl

    lock = in_use_lock(cache_root)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only cache: nothing can be pruned there either
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
