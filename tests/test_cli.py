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
