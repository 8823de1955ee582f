"""pretrain.export: a Hugging Face Llama that transformers loads and that computes our logits."""
import subprocess
import sys

import pytest
import torch

from conftest import MAIN, ROOT, common, launch

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"]])
def test_hugging_face_export_round_trip(tiny_data, tmp_path, layout):
    config = "zero1_pp.json" if "--pp" in layout else "zero3.json"
    dump = tmp_path / "dump.pt"
    launch(2, MAIN, "--deepspeed_config", f"ds_configs/{config}", "--fp32", "--train-iters", "3", "--save",
           tmp_path / "ck", *layout, *common(tiny_data, tmp_path), env={"PRETRAIN_DUMP_LOGITS": str(dump)})
    subprocess.run([sys.executable, "-m", "pretrain.export", "--load", str(tmp_path / "ck"), "--output",
                    str(tmp_path / "hf"), "--dtype", "float32"], cwd=ROOT, check=True, capture_output=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ref = torch.load(dump, weights_only=True)
    with torch.no_grad():
        logits = model(ref["tokens"]).logits
    if "logits" in ref:
        assert (logits - ref["logits"]).abs().max().item() < 1e-4
    else:  # pipeline parallel: the last stage's loss on the same micro-batch
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ref["labels"].flatten())
        assert abs(loss.item() - ref["loss"]) < 1e-4 * ref["loss"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tok.eos_token == "<|endoftext|>"
    assert not list((tmp_path / "hf").glob("*.bin")) and (tmp_path / "hf" / "model.safetensors").exists()
