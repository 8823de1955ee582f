"""Checkpoints go everywhere: from every supported layout to Hugging Face (transformers computes our logits), and
from one layout into another (the resumed run continues the uninterrupted one).

One reference run per layout (tiny model, synthetic batches that depend only on the step, constant LR) trains
3 steps, saves, dumps the full-vocabulary logits of a held-out micro-batch, and trains on to step 8. ZeRO-3 runs
use the shipped "auto" sizing, so every weight matrix is really partitioned (checked).
"""
import json
import math

import pytest
import torch

from conftest import WORKERS, launch

pytestmark = pytest.mark.slow

SAVE_AT, STEPS = 3, 8
FP32_LAYOUTS = [dict(zero=z, tp=tp, dp=dp) for z in (0, 1, 2, 3) for tp in (1, 2) for dp in (1, 2)] + \
    [dict(zero=z, pp=2, dp=1) for z in (0, 1)]
BF16_LAYOUTS = [dict(ds_config="ds_configs/zero3.json", dp=2), dict(zero=1, pp=2, dp=1, bf16=True),
                dict(zero=0, tp=2, dp=1, bf16=True)]


def _key(layout: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in sorted(layout.items())).replace("/", "_").replace(".json", "")


def _args(layout: dict) -> tuple[int, list]:
    tp, pp, dp = layout.get("tp", 1), layout.get("pp", 1), layout["dp"]
    args = ["--tp", tp, "--pp", pp]
    args += ["--ds-config", layout["ds_config"]] if "ds_config" in layout else ["--zero", layout["zero"]]
    if layout.get("bf16") or "ds_config" in layout:
        args.append("--bf16")
    return tp * pp * dp, [str(a) for a in args]


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """reference(layout) -> directory with ck/ (checkpoint at step 3), logits-3.pt and report.json (steps 1-8)."""
    root, cache = tmp_path_factory.mktemp("layouts"), {}

    def run(layout: dict):
        key = _key(layout)
        if key not in cache:
            d = root / key
            d.mkdir()
            n, args = _args(layout)
            launch(n, WORKERS / "train_layout.py", *args, "--steps", STEPS, "--save", d / "ck", "--save-at", SAVE_AT,
                   "--dump-logits", d / "logits-{step}.pt", "--out", d / "report.json")
            cache[key] = d
        return cache[key]

    return run


def _report(d) -> dict:
    return json.loads((d / "report.json").read_text())


@pytest.fixture(scope="module")
def hf_logits(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from pretrain.export import export

    def run(ref_dir, dtype):
        out = tmp_path_factory.mktemp("hf")
        export(str(ref_dir / "ck"), str(out / "model"), dtype=dtype)
        torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch_dtype).eval()
        ours = torch.load(ref_dir / f"logits-{SAVE_AT}.pt", weights_only=True)
        with torch.no_grad():
            theirs = model(ours["tokens"]).logits.float()
        return theirs, ours["logits"]

    return run


@pytest.mark.parametrize("layout", FP32_LAYOUTS, ids=_key)
def test_export_from_every_fp32_layout_gives_our_logits(reference, hf_logits, layout):
    theirs, ours = hf_logits(reference(layout), "float32")
    err = (theirs - ours).abs().max().item()
    print(f"{_key(layout)}: max |HF - ours| = {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("layout", BF16_LAYOUTS, ids=_key)
def test_export_from_bf16_runs_within_bf16_rounding(reference, hf_logits, layout):
    """bf16 runs export their fp32 masters rounded to bf16, which are exactly the weights they compute with; what
    differs is the kernels' rounding of bf16 arithmetic (HF's RMSNorm and ours)."""
    theirs, ours = hf_logits(reference(layout), "bfloat16")
    err = (theirs - ours).abs().max().item() / ours.abs().max().item()
    print(f"{_key(layout)}: max |HF - ours| / max |ours| = {err:.2e}")
    assert err < 2e-2


def test_zero3_runs_really_partition_their_parameters(reference):
    for layout in (dict(zero=3, tp=1, dp=2), dict(zero=3, tp=2, dp=2), dict(ds_config="ds_configs/zero3.json", dp=2)):
        r = _report(reference(layout))
        # every weight matrix is partitioned; only the norm weights (64 < 10 x hidden) stay whole
        assert r["partitioned"] == r["zero3_params"] - 5 and r["partitioned_elements"] > 0.99 * r["all_elements"], r


RESUMES = [  # (saved under, resumed under)
    (dict(zero=3, tp=1, dp=2), dict(zero=3, tp=2, dp=1)),
    (dict(zero=3, tp=2, dp=1), dict(zero=3, tp=1, dp=2)),
    (dict(zero=1, pp=2, dp=1), dict(zero=3, tp=1, dp=2)),
    (dict(zero=3, tp=1, dp=2), dict(zero=1, tp=1, dp=2)),
    (dict(zero=1, tp=1, dp=1), dict(zero=2, tp=1, dp=2)),  # growing data parallelism, ZeRO-1 -> ZeRO-2
    (dict(zero=0, tp=2, dp=1), dict(zero=1, pp=2, dp=1)),
]


@pytest.mark.parametrize("saved, resumed", RESUMES, ids=lambda x: _key(x))
def test_resume_under_another_layout_continues_the_run(reference, tmp_path, saved, resumed):
    ref = reference(saved)
    n, args = _args(resumed)
    launch(n, WORKERS / "train_layout.py", *args, "--steps", STEPS, "--load", ref / "ck", "--out", tmp_path / "r.json")
    want, got = _report(ref)["losses"], json.loads((tmp_path / "r.json").read_text())["losses"]
    assert sorted(got, key=int) == [str(s) for s in range(SAVE_AT + 1, STEPS + 1)]
    diffs = {s: abs(got[s] - want[s]) / abs(want[s]) for s in got}
    print(f"{_key(saved)} -> {_key(resumed)}: relative loss differences {diffs}")
    assert max(diffs.values()) <= 1e-5


def test_resume_is_sensitive_to_the_optimizer_state(reference, tmp_path):
    """The comparison above can fail: resuming the weights without Adam's moments changes the trajectory."""
    ref = reference(dict(zero=3, tp=1, dp=2))
    n, args = _args(dict(zero=3, tp=2, dp=1))
    launch(n, WORKERS / "train_layout.py", *args, "--steps", STEPS, "--load", ref / "ck", "--no-load-optimizer",
           "--out", tmp_path / "r.json")
    want, got = _report(ref)["losses"], json.loads((tmp_path / "r.json").read_text())["losses"]
    assert got[str(SAVE_AT + 1)] == pytest.approx(want[str(SAVE_AT + 1)], rel=1e-5)  # same weights
    assert max(abs(got[s] - want[s]) / want[s] for s in got) > 1e-3  # other moments, other steps


def test_bf16_pipeline_resume_is_bit_identical(reference, tmp_path):
    layout = dict(zero=1, pp=2, dp=1, bf16=True)
    ref = reference(layout)
    n, args = _args(layout)
    launch(n, WORKERS / "train_layout.py", *args, "--steps", STEPS, "--load", ref / "ck", "--out", tmp_path / "r.json")
    want, got = _report(ref)["losses"], json.loads((tmp_path / "r.json").read_text())["losses"]
    assert all(math.isfinite(v) for v in got.values())
    assert {s: got[s] for s in got} == {s: want[s] for s in got}
