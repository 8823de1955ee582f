"""pretrain.export from a pretrain/main.py run under the default config (ZeRO-3 bf16 as shipped, DP=2): a Hugging
Face Llama that transformers loads, with the run's tokenizer, computing the run's logits; and an --output that
would destroy anything is refused with nothing touched. (Every other layout: test_checkpoint_layouts.py.)"""
import os
import subprocess
import sys

import pytest
import torch

from conftest import MAIN, ROOT, common, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default")
    launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "3", "--save", tmp / "ck",
           *common(tiny_data, tmp), env={"PRETRAIN_DUMP_LOGITS": str(tmp / "dump.pt")})
    return tmp


def export(*args):
    return subprocess.run([sys.executable, "-m", "pretrain.export", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True)


def test_default_config_exports_to_transformers(default_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = export("--load", default_run / "ck", "--output", tmp_path / "hf")
    assert res.returncode == 0, res.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    ours = torch.load(default_run / "dump.pt", weights_only=True)
    with torch.no_grad():
        theirs = model(ours["tokens"]).logits.float()
    assert (theirs - ours["logits"]).abs().max() / ours["logits"].abs().max() < 2e-2
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>"
    assert not list((tmp_path / "hf").glob("*.bin")) and (tmp_path / "hf" / "model.safetensors").exists()


def test_export_never_destroys_what_it_did_not_write(default_run, tmp_path):
    ck = default_run / "ck"
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for out in (foreign, ck, ck / "iter_0000003", default_run):
        res = export("--load", ck, "--output", out)
        assert res.returncode == 2 and "--output" in res.stderr, res.stderr
    res = subprocess.run([sys.executable, "-m", "pretrain.export", "--load", str(ck), "--output", "."],
                         cwd=foreign, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2
    assert (foreign / "keep.txt").read_text() == "mine" and sorted(os.listdir(foreign)) == ["keep.txt"]
    assert (ck / "iter_0000003" / "meta.json").exists() and (ck / "latest").exists()
    # an earlier export is ours to replace
    assert export("--load", ck, "--output", tmp_path / "hf").returncode == 0
    (tmp_path / "hf" / "extra").write_text("x")
    assert export("--load", ck, "--output", tmp_path / "hf", "--dtype", "float32").returncode == 0
    assert not (tmp_path / "hf" / "extra").exists() and (tmp_path / "hf" / "dsllm_export.json").exists()
