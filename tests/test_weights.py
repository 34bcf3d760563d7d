"""Pretrained weights that are not in the local cache: `ens validate`/`ens plan` name them, `ens run` offline
stops before training with one line naming the arch, the hub id and the fixes, and a failed download is one line
(never the hub's traceback). Offline (HF_HUB_OFFLINE=1) with an empty HF_HOME: nothing is downloaded."""

import subprocess
import sys
import time

from conftest import REPO, ens

PRETRAINED = """\
competition: digits
defaults: {size: 32, epochs: 1, batch_size: 64, num_workers: 0, tta: {n: 0}}
members:
  - {name: fromzero, arch: test_convnext, pretrained: false}
  - {name: tiny, arch: test_resnet}
"""
HUB_ID = "timm/test_resnet.r160_in1k"


def _offline(tmp_path) -> dict:
    (tmp_path / "hf").mkdir(exist_ok=True)
    return {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}


def test_validate_and_plan_name_the_weights_not_available_locally(project, tmp_path):
    (project / "ensembles/digits/pre.yaml").write_text(PRETRAINED)
    out = ens("validate", "digits/pre.yaml", cwd=project, env_extra=_offline(tmp_path))
    assert out.returncode == 0, out.stderr
    assert f"not in the local cache, and HF_HUB_OFFLINE forbids fetching them (ens run will stop before training): " \
           f"tiny (test_resnet: {HUB_ID}); set pretrained: false" in out.stderr, out.stderr
    assert "fromzero" not in out.stderr and "unset HF_HUB_OFFLINE" in out.stderr
    plan = ens("plan", "digits/pre.yaml", cwd=project, env_extra=_offline(tmp_path))
    assert plan.returncode == 0 and f"tiny (test_resnet: {HUB_ID})" in plan.stdout, plan.stdout + plan.stderr


def test_run_offline_without_the_weights_is_one_line_before_any_training(project, tmp_path):
    (project / "ensembles/digits/pre.yaml").write_text(PRETRAINED)
    start = time.perf_counter()
    out = ens("run", "digits/pre.yaml", cwd=project, env_extra=_offline(tmp_path))
    seconds = time.perf_counter() - start
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"tiny (test_resnet: {HUB_ID})" in lines[0] and "pretrained: false" in lines[0], lines
    assert not any((project / "cache").rglob("meta.json"))  # the from-scratch member (fromzero) was not trained first
    assert seconds < 120, seconds  # no retries


def test_a_failed_download_is_one_line_naming_arch_hub_id_and_fixes(tmp_path):
    # the learner's own fetch, past the run's check: the hub's LocalEntryNotFoundError becomes one EnsError line
    code = ("import timm\n"
            "from pipelines.config import Member\n"
            "from pipelines.errors import EnsError\n"
            "from pipelines.models import fetching_weights\n"
            "try:\n"
            "    with fetching_weights(Member(name='tiny', arch='test_resnet')):\n"
            "        timm.create_model('test_resnet', pretrained=True)\n"
            "except EnsError as e:\n"
            "    print('ERROR', e)\n")
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), **_offline(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert f"downloading weights for test_resnet ({HUB_ID}) ..." in out.stderr, out.stderr
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("ERROR")]
    assert line.startswith(f"ERROR member tiny: cannot fetch the pretrained weights of test_resnet ({HUB_ID}): "
                           "LocalEntryNotFoundError"), line
    assert line.endswith("set pretrained: false (train from scratch), give a weights file (pretrained: "
                         "path/to/weights.pth), or connect to the network and unset HF_HUB_OFFLINE"), line
