"""Checkpoints go everywhere: from every supported layout to Hugging Face (transformers computes our logits), and
from one layout into another (the resumed run continues the uninterrupted one).

Every layout's reference is the shared `train_layout` run (conftest.py): tiny model, synthetic batches that depend
only on the step, constant LR, 8 steps, a checkpoint and the logits of a held-out micro-batch after step 3.
ZeRO-3 runs use the shipped "auto" sizing, so every weight matrix is really partitioned (checked).
"""
import json

import pytest
import torch

from conftest import LAYOUT_SAVE_AT, LAYOUT_STEPS, WORKERS, launch

pytestmark = pytest.mark.slow

# (ranks, flags); ranks = TP x PP x CP x DP
FP32_LAYOUTS = [(tp * dp, dict(zero=z, tp=tp)) for z in (0, 1, 2, 3) for tp in (1, 2) for dp in (1, 2)] + \
    [(2, dict(zero=z, pp=2)) for z in (0, 1)]
BF16_LAYOUTS = [(2, dict(ds_config="ds_configs/zero3.json", bf16=True)), (2, dict(zero=1, pp=2, bf16=True)),
                (2, dict(zero=0, tp=2, bf16=True))]


def _id(layout) -> str:
    n, flags = layout
    dp = n // (flags.get("tp", 1) * flags.get("pp", 1) * flags.get("cp", 1))
    return "-".join([f"dp{dp}"] + [f"{k}{v}" for k, v in sorted(flags.items())]).replace("ds_configs/", "")


@pytest.fixture(scope="module")
def hf_logits(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from pretrain.export import export

    def run(ref, dtype):
        out = tmp_path_factory.mktemp("hf")
        export(str(ref["dir"] / "ck"), str(out / "model"), dtype=dtype)
        torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch_dtype).eval()
        ours = torch.load(ref["dir"] / f"logits-{LAYOUT_SAVE_AT}.pt", weights_only=True)
        with torch.no_grad():
            theirs = model(ours["tokens"]).logits.float()
        return theirs, ours["logits"]

    return run


@pytest.mark.parametrize("layout", FP32_LAYOUTS, ids=_id)
def test_export_from_every_fp32_layout_gives_our_logits(train_layout, hf_logits, layout):
    theirs, ours = hf_logits(train_layout(layout[0], **layout[1]), "float32")
    err = (theirs - ours).abs().max().item()
    print(f"{_id(layout)}: max |HF - ours| = {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("layout", BF16_LAYOUTS, ids=_id)
def test_export_from_bf16_runs_within_bf16_rounding(train_layout, hf_logits, layout):
    """bf16 runs export their fp32 masters rounded to bf16, which are exactly the weights they compute with; what
    differs is the kernels' rounding of bf16 arithmetic (HF's RMSNorm and ours)."""
    theirs, ours = hf_logits(train_layout(layout[0], **layout[1]), "bfloat16")
    err = (theirs - ours).abs().max().item() / ours.abs().max().item()
    print(f"{_id(layout)}: max |HF - ours| / max |ours| = {err:.2e}")
    assert err < 2e-2


def test_zero3_runs_really_partition_their_parameters(train_layout):
    for n, flags in ((2, dict(zero=3)), (4, dict(zero=3, tp=2)), (2, dict(ds_config="ds_configs/zero3.json",
                                                                          bf16=True))):
        r = train_layout(n, **flags)
        # every weight matrix is partitioned; only the norm weights (64 < 10 x hidden) stay whole
        assert r["partitioned"] == r["zero3_params"] - 5 and r["partitioned_elements"] > 0.99 * r["all_elements"], r


RESUMES = [  # (saved under, resumed under)
    ((2, dict(zero=3)), (2, dict(zero=3, tp=2))),
    ((2, dict(zero=3, tp=2)), (2, dict(zero=3))),
    ((2, dict(zero=1, pp=2)), (2, dict(zero=3))),
    ((2, dict(zero=3)), (2, dict(zero=1))),
    ((1, dict(zero=1)), (2, dict(zero=2))),  # growing data parallelism, ZeRO-1 -> ZeRO-2
    ((2, dict(zero=0, tp=2)), (2, dict(zero=1, pp=2))),
    ((4, dict(zero=3, cp=2)), (2, dict(zero=1))),  # context parallel (ZeRO-3 over DP 2 x CP 2) -> none
    ((2, dict(zero=3)), (4, dict(zero=3, cp=2))),  # and back: the partitions now span 4 ranks
]


def _resume(train_layout, tmp_path, saved, resumed, *extra):
    ref = train_layout(saved[0], **saved[1])
    args = [a for k, v in sorted(resumed[1].items()) for a in (["--" + k.replace("_", "-")] +
                                                                 ([] if v is True else [str(v)]))]
    launch(resumed[0], WORKERS / "train_layout.py", *args, "--steps", LAYOUT_STEPS, "--load", ref["dir"] / "ck",
           *extra, "--out", tmp_path / "r.json")
    return ref["by_step"], json.loads((tmp_path / "r.json").read_text())["losses"]


@pytest.mark.parametrize("saved, resumed", RESUMES, ids=_id)
def test_resume_under_another_layout_continues_the_run(train_layout, tmp_path, saved, resumed):
    want, got = _resume(train_layout, tmp_path, saved, resumed)
    assert sorted(got, key=int) == [str(s) for s in range(LAYOUT_SAVE_AT + 1, LAYOUT_STEPS + 1)]
    diffs = {s: abs(got[s] - want[s]) / abs(want[s]) for s in got}
    print(f"{_id(saved)} -> {_id(resumed)}: relative loss differences {diffs}")
    assert max(diffs.values()) <= 1e-5


def test_resume_is_sensitive_to_the_optimizer_state(train_layout, tmp_path):
    """The comparison above can fail: resuming the weights without Adam's moments changes the trajectory."""
    want, got = _resume(train_layout, tmp_path, (2, dict(zero=3)), (2, dict(zero=3, tp=2)), "--no-load-optimizer")
    assert got[str(LAYOUT_SAVE_AT + 1)] == pytest.approx(want[str(LAYOUT_SAVE_AT + 1)], rel=1e-5)  # same weights
    assert max(abs(got[s] - want[s]) / want[s] for s in got) > 1e-3  # other moments, other steps


def test_bf16_pipeline_resume_is_bit_identical(train_layout, tmp_path):
    layout = (2, dict(zero=1, pp=2, bf16=True))
    want, got = _resume(train_layout, tmp_path, layout, layout)
    assert got == {s: want[s] for s in got} and len(got) == LAYOUT_STEPS - LAYOUT_SAVE_AT
