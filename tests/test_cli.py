"""The `ens` command's own surface: help texts as a user reads them."""

from conftest import REPO, ens


def test_parallel_help_names_the_ray_extra():
    """Rich takes `[ray]` for markup and drops it: the help must show `ens[ray]` as written."""
    out = ens("run", "--help", cwd=REPO, env_extra={"COLUMNS": "300"})
    assert out.returncode == 0 and "ens[ray]" in out.stdout and "pip install 'ens[ray]'" in out.stdout, out.stdout


def test_process_seconds_counts_from_the_process_start():
    """Start-up timings count imports from the process's own start (/proc), not from when ens was imported."""
    import subprocess
    import sys

    code = "import time; time.sleep(0.6); from pipelines.util import process_seconds; print(process_seconds())"
    seconds = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.6 <= seconds < 30


def test_cache_ls_of_an_unknown_competition_names_it(project):
    """`ens cache ls nope` said "no cached members yet", as for a competition with an empty cache (a review)."""
    r = ens("cache", "ls", "nope", cwd=project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "no competition 'nope'" in r.stderr and "known: digits" in r.stderr, r.stderr
    assert ens("cache", "ls", "digits", cwd=project).stdout.strip() == "no cached members yet"
