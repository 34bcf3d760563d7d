"""`ens report`: the tiny digits ensemble's report, written once and opened in headless Chromium (Debian's
`chromium`, installed here when missing and we are root): the page loads with no console message at all (its
Content-Security-Policy turns any external resource or script into one), every section is there, and every
embedded image decodes (naturalWidth > 0)."""

import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import copy_project
from pipelines.config import Project
from pipelines.report import SECTIONS, build_report
from pipelines.run import run_ensemble

pytestmark = pytest.mark.slow  # needs the trained tiny ensemble

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]

# Inserted at the top of <head>, before the report's Content-Security-Policy (which forbids scripts from there
# on): records errors (resource failures included, in the capture phase) and, once everything has loaded, each
# section's images and how many decoded, into <body data-check> for --dump-dom to show.
CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.href)) || 'error')), true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('csp: ' + e.violatedDirective + ' ' + e.blockedURI));
window.addEventListener('load', () => {
  const sections = {};
  for (const s of document.querySelectorAll('section[id]')) {
    const imgs = [...s.querySelectorAll('img')];
    sections[s.id] = {images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length};
  }
  const all = [...document.images];
  document.body.dataset.check = JSON.stringify({sections, errors: window.__errors, images: all.length,
    decoded: all.filter(i => i.complete && i.naturalWidth > 0).length, width: document.documentElement.scrollWidth});
});
</script>"""


def _install_chromium() -> str | None:
    """Debian's chromium; installed with apt-get when missing and we may (root). None when it cannot be had."""
    found = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if found or not shutil.which("apt-get") or os.geteuid() != 0:
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600, check=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                       capture_output=True, timeout=1200, check=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = _install_chromium()
    if not path:
        pytest.skip("headless Chromium is not available and could not be installed "
                    "(as root: apt-get update && apt-get install -y chromium)")
    return path


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory):
    """(project root, report path, seconds to build): one `ens run` first, so the history has a row."""
    root = copy_project(tiny_run[0], tmp_path_factory.mktemp("report") / "p")
    run_ensemble(Project(root), "digits/tiny.yaml")
    start = time.perf_counter()
    path = build_report(Project(root), "digits/tiny.yaml")
    return root, path, time.perf_counter() - start


def _browse(chromium: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "CONSOLE(" in line]


def test_report_is_one_self_contained_file(report):
    root, path, seconds = report
    assert path == root / "submissions" / "digits" / "report-tiny.html"
    text = path.read_text()
    for key in SECTIONS:
        assert f'<section id="{key}">' in text
    sources = re.findall(r'\ssrc="([^"]*)"', text)
    assert sources and all(s.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for s in sources)
    assert not re.search(r'\s(?:src|href)="(?:https?:)?//', text)  # nothing fetched from anywhere
    assert "<script" not in text
    assert "Content-Security-Policy" in text
    for name in ("convnext", "effnet", "resnet"):
        assert name in text
    assert seconds < 60, f"the tiny report took {seconds:.1f}s"


def test_report_dest_and_cached_only(report, tmp_path):
    root, _, _ = report
    dest = build_report(Project(root), "digits/tiny.yaml", ["members.resnet.epochs=2"], cached_only=True,
                        dest=tmp_path / "out" / "r.html")
    assert dest == tmp_path / "out" / "r.html" and dest.is_file()
    text = dest.read_text()
    assert "left out (--cached-only): resnet" in text  # resnet with 2 epochs is not cached: reported, not trained
    assert not any(p.name.startswith(".partial") for p in (root / "cache" / "digits").iterdir())


def test_report_opens_in_headless_chromium(report, chromium, tmp_path):
    _, path, _ = report
    # 1. the report as written: no console message at all (any blocked resource or script would log one)
    shot = tmp_path / "report.png"
    done = _browse(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1280,4000", path.as_uri())
    assert not _console(done.stderr), _console(done.stderr)
    assert shot.is_file() and shot.stat().st_size > 10_000
    if os.environ.get("ENS_REPORT_SCREENSHOT"):  # to refresh the README's picture
        shutil.copy(shot, os.environ["ENS_REPORT_SCREENSHOT"])

    # 2. the same page with a check script in front of it: every section there, every image decoded
    text = path.read_text()
    checked = tmp_path / "checked.html"
    checked.write_text(text.replace('<meta http-equiv="Content-Security-Policy"',
                                    CHECK_SCRIPT + '<meta http-equiv="Content-Security-Policy"', 1))
    done = _browse(chromium, tmp_path, "--dump-dom", "--window-size=1280,4000", checked.as_uri())
    found = re.search(r'data-check="([^"]*)"', done.stdout)
    assert found, "the page's load event never fired: " + done.stderr[-2000:]
    check = json.loads(html.unescape(found.group(1)))
    assert check["errors"] == [] and not _console(done.stderr), (check["errors"], _console(done.stderr))
    assert list(check["sections"]) == list(SECTIONS)
    minimum = {"glance": 1, "curves": 3, "classes": 4, "ablation": 3, "similarity": 1, "submissions": 1, "mistakes": 1}
    for key, least in minimum.items():
        s = check["sections"][key]
        assert s["images"] >= least and s["decoded"] == s["images"], (key, s)
    assert check["decoded"] == check["images"] > 0
    assert check["width"] <= 1280, "the page scrolls sideways"
