"""Resharding through the trainer itself: a pretrain/main.py run resumed under another layout (automatic) or from
`python -m pretrain.convert`'s output continues the uninterrupted run, optimizer and data position included."""
import json
import subprocess
import sys

import pytest

from conftest import MAIN, ROOT, common, launch, metrics, train_losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """Uninterrupted fp32 run under the default config (ZeRO-3, DP=2), with a checkpoint at iteration 4."""
    tmp = tmp_path_factory.mktemp("ref")
    launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "8",
           "--lr-decay-style", "constant", "--save", tmp / "ck", "--save-interval", "4", *common(tiny_data, tmp))
    (tmp / "ck" / "latest").write_text("iter_0000004")  # resume from the middle
    return tmp


def _continues(reference, resumed):
    want, got = train_losses(metrics(reference)), train_losses(metrics(resumed))
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-5 * abs(want[s]), (s, got[s], want[s])


def _run(tiny_data, tmp_path, load, *layout):
    return launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "8",
                  "--lr-decay-style", "constant", "--load", load, "--save", tmp_path / "ck", "--save-interval", "8",
                  *layout, *common(tiny_data, tmp_path)).stdout


def test_resume_under_another_tp_and_dp_is_automatic(tiny_data, tmp_path, reference):
    out = _run(tiny_data, tmp_path, reference / "ck", "--tp", "2")
    assert "at iteration 4" in out and "saved under TP=1 PP=1 DP=2 ZeRO-3, resharded to TP=2 PP=1 DP=1 ZeRO-3" in out
    _continues(reference, tmp_path)
    meta = json.loads((tmp_path / "ck" / "iter_0000008" / "meta.json").read_text())
    assert meta["run_config"]["resumed_from"]["converted"] is True
    assert meta["run_config"]["resumed_from"]["layout"]["dp"] == 2


def test_convert_command_then_resume(tiny_data, tmp_path, reference):
    conv = tmp_path / "tp2"
    cmd = [sys.executable, "-m", "pretrain.convert", "--load", str(reference / "ck"), "--tp", "2"]
    res = subprocess.run(cmd + ["--output", str(conv)], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (conv / "iter_0000004").glob("*.safetensors"))[:2] == \
        ["tp00-stage00000.safetensors", "tp00-stage00001.safetensors"]
    out = _run(tiny_data, tmp_path, conv, "--tp", "2")
    assert "resumed from" in out and "at iteration 4" in out
    _continues(reference, tmp_path)
    # converting again into its own earlier output is fine; into the checkpoint or a foreign directory is not
    assert subprocess.run(cmd + ["--output", str(conv)], cwd=ROOT, capture_output=True).returncode == 0
    for bad in (reference / "ck", reference):
        res = subprocess.run(cmd + ["--output", str(bad)], cwd=ROOT, capture_output=True, text=True)
        assert res.returncode == 2 and "--output" in res.stderr
    assert (reference / "ck" / "iter_0000004" / "meta.json").exists()
    res = subprocess.run(cmd + ["--tp", "3", "--output", str(tmp_path / "x")], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "not divisible by --tp 3" in res.stderr
