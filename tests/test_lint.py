"""The tree stays clean under the linter configured in pyproject.toml (ruff, line length 120)."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
