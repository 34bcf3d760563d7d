"""The `ens` command's own surface: help texts as a user reads them."""

from conftest import REPO, ens


def test_parallel_help_names_the_ray_extra():
    """Rich takes `[ray]` for markup and drops it: the help must show `ens[ray]` as written."""
    out = ens("run", "--help", cwd=REPO, env_extra={"COLUMNS": "300"})
    assert out.returncode == 0 and "ens[ray]" in out.stdout and "pip install 'ens[ray]'" in out.stdout, out.stdout
