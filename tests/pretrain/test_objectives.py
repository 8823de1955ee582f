"""pretrain/objectives.py: each objective answers what used to be a comparison of its name (attention, options,
data, loss tokens, export family, the planner's loss tokens)."""
import argparse

import pytest

from pretrain import hf
from pretrain.arguments import build_parser
from pretrain.config import preset
from pretrain.objectives import OBJECTIVES, for_hf_family, objective
from pretrain.plan import PlanInput, format_plan, plan


def args(**kw):
    base = dict(mask_prob=None, mask_replace_prob=None, mask_random_prob=None, sample_prompt=None, eval_tasks=None)
    return argparse.Namespace(**{**base, **kw})


def test_every_objective_is_a_choice_of_the_flag_and_of_the_model_config():
    flag = next(a for a in build_parser()._actions if a.dest == "objective")
    assert list(flag.choices) == list(OBJECTIVES) == ["clm", "mlm", "sft"]
    for name in OBJECTIVES:
        cfg = preset("tiny", objective=name)
        assert cfg.causal == objective(name).causal
    with pytest.raises(ValueError, match="use one of clm, mlm"):
        preset("tiny", objective="sft2")


def test_options_of_another_objective_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match="--mask-prob applies to --objective mlm only; this run trains clm .*pass "
                                         "--objective mlm"):
        objective("clm").check_options(args(mask_prob=0.2))
    objective("mlm").check_options(args(mask_prob=0.2))
    with pytest.raises(ValueError, match="--sample-prompt generates text, which an mlm encoder does not do"):
        objective("mlm").check_options(args(sample_prompt="the"))
    objective("clm").check_options(args(sample_prompt="the", eval_tasks="x"))


def test_export_family_loss_tokens_and_the_plan_come_from_the_objective():
    assert for_hf_family("eurobert").name == "mlm" and for_hf_family("qwen2").name == "clm"
    assert hf.export_family(preset("tiny", objective="mlm")) == "eurobert"
    assert hf.export_family(preset("tiny", objective="clm")) == "llama"
    for name, share in (("clm", 1.0), ("mlm", 0.15)):
        r = plan(PlanInput(model=preset("tiny", objective=name), nodes=1, gpus_per_node=1, micro_batch_size=2,
                           seq_length=64))
        assert r["speed"]["loss_tokens_per_step"] == round(r["speed"]["tokens_per_step"] * share)
        assert ("objective mlm" in format_plan(r)) == (name == "mlm")


def test_data_format_and_objective_must_match_naming_the_fix():
    for name in ("clm", "mlm"):
        with pytest.raises(ValueError, match="holds chat data, which --objective .* pass --objective sft"):
            objective(name).check_data({"text", "chat"})
        objective(name).check_data({"text"})
    with pytest.raises(ValueError, match="holds text data.*prepare --format chat\\|instruction"):
        objective("sft").check_data({"chat", "text"})
    objective("sft").check_data({"chat", "instruction"})
    sft = objective("sft")
    assert sft.causal and sft.generates and sft.global_loss_tokens and sft.hf_family is None
    assert "mlm" not in sft.from_objectives and "clm" in sft.from_objectives
