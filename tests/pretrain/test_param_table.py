"""pretrain/param_table.py: the family table is what the model builds, and a parameter without its row fails at
construction, naming it (issue 35's first step). The table's readers (shapes, TP splits, initialisation,
checkpoints, Hugging Face export and import) are exercised by the suites that test them (test_checkpoint_layouts,
test_import_hf, test_export, test_parallel_equivalence), unchanged."""
import dataclasses

import pytest
import torch

from pretrain import param_table
from pretrain.config import PRESETS, preset
from pretrain.parallel import LayoutError


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"add_bias": True}, {"qkv_bias": True}],
                         ids=["plain", "tied", "biases", "qkv-bias"])
def test_every_preset_builds_exactly_its_table(meta_model_builder, name, overrides):
    from pretrain.model import check_against_table

    cfg = preset(name, **overrides)
    model = meta_model_builder(cfg)
    check_against_table(model, cfg, whole=True)  # raises on any difference
    assert list(cfg.parameter_shapes()) == list(param_table.entries(cfg))
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())  # the counts come from the table too


def _without(row_name):
    return tuple(p for p in param_table.DENSE if p.name != row_name)


def test_a_built_parameter_missing_from_the_table_fails_at_construction(meta_model_builder, monkeypatch):
    from pretrain.model import init_parameters

    cfg = preset("tiny")
    model = meta_model_builder(cfg, device="cpu")
    init_parameters(model, cfg, seed=1)  # the table as shipped: fine
    monkeypatch.setitem(param_table.TABLES, "dense", _without("layer.mlp.linear_fc2.weight"))
    with pytest.raises(LayoutError, match=r"1\.layer\.mlp\.linear_fc2\.weight.*pretrain/param_table\.py"):
        init_parameters(model, cfg, seed=1)


def test_a_row_the_model_does_not_build_or_builds_otherwise_fails_at_construction(meta_model_builder, monkeypatch):
    from pretrain.model import check_against_table

    cfg = preset("tiny")
    model = meta_model_builder(cfg, device="cpu")
    always = dataclasses.replace(next(p for p in param_table.DENSE if p.name == "layer.mlp.linear_fc2.bias"),
                                 present=lambda c: True)  # says every model has an fc2 bias: this one has none
    monkeypatch.setitem(param_table.TABLES, "dense", (*param_table.DENSE, always))
    with pytest.raises(LayoutError, match=r"linear_fc2\.bias.*did not build"):
        check_against_table(model, cfg, whole=True)
    check_against_table(model, cfg, whole=False)  # one pipeline stage: rows of other stages may be absent
    wrong = tuple(dataclasses.replace(p, shape=lambda c: (c.hidden_size, 2 * c.ffn_hidden_size))
                  if p.name == "layer.mlp.linear_fc2.weight" else p for p in param_table.DENSE)
    monkeypatch.setitem(param_table.TABLES, "dense", wrong)
    with pytest.raises(LayoutError, match=r"linear_fc2\.weight: built with shape"):
        check_against_table(model, cfg, whole=True)


def test_a_name_in_no_table_is_refused_naming_the_fix():
    from pretrain import sharding

    assert sharding.split_rule("module.3.layer.mlp.linear_fc1.weight") == (0, True)
    assert sharding.split_rule("5.norm.weight") == (None, False)  # the final norm, not a layer's layernorm
    with pytest.raises(KeyError, match="pretrain/param_table.py"):
        sharding.split_rule("3.layer.mlp.experts.linear_fc1.weight")


def test_hf_names_follow_the_fused_layouts():
    e = param_table.entries(preset("tiny", qkv_bias=True))
    assert e["1.layer.self_attention.linear_qkv.weight"].hf_names() == [
        f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    assert e["2.layer.mlp.linear_fc1.weight"].hf_names() == [
        "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert e["1.layer.self_attention.linear_qkv.bias"].hf_names()[1] == "model.layers.0.self_attn.k_proj.bias"
    assert e["3.norm.weight"].hf_names() == ["model.norm.weight"]


@pytest.mark.parametrize("cfg", [preset("tiny", num_experts=4), preset("tiny", num_experts=8, moe_top_k=1,
                                                                       moe_ffn_hidden_size=32, tie_embeddings=True),
                                 preset("tiny", num_experts=4, moe_shared_expert_size=48)],
                         ids=["4-experts", "8-experts-top1-tied", "shared-expert"])
def test_a_mixture_of_experts_builds_exactly_its_table(meta_model_builder, cfg):
    """The MoE family's table (megatron-core's MoELayer: router, per-expert SwiGLU) is what the model builds."""
    from pretrain.model import check_against_table

    model = meta_model_builder(cfg, device="cpu")
    check_against_table(model, cfg, whole=True)
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    experts = [n for n in param_table.entries(cfg) if ".local_experts." in n]
    assert len(experts) == 2 * cfg.num_experts * cfg.num_layers  # fc1 and fc2 of every expert of every layer
    assert cfg.active_params() < cfg.num_params()


def test_a_missing_expert_row_fails_at_construction(meta_model_builder, monkeypatch):
    from pretrain.model import init_parameters

    cfg = preset("tiny", num_experts=4)
    model = meta_model_builder(cfg, device="cpu")
    init_parameters(model, cfg, seed=1)
    monkeypatch.setitem(param_table.TABLES, "moe", tuple(p for p in param_table.MOE if "router" not in p.name))
    with pytest.raises(LayoutError, match=r"1\.layer\.mlp\.router\.weight.*pretrain/param_table\.py"):
        init_parameters(model, cfg, seed=1)


def test_experts_are_named_and_seeded_by_their_global_index(meta_model_builder):
    """Under --ep a rank builds experts local_experts.0.. of its own share: named (and so initialised, saved and
    exported) by their global index, as if one rank held them all."""
    from pretrain import sharding
    from pretrain.model import init_parameters

    cfg = preset("tiny", num_experts=4)
    whole, share = meta_model_builder(cfg, device="cpu"), meta_model_builder(cfg, device="cpu")
    init_parameters(whole, cfg, seed=1)
    for m in share.modules():  # as EP rank 1 of 2 would hold them: global experts 2 and 3 as local 0 and 1
        if hasattr(m, "local_expert_indices"):
            m.local_expert_indices = [2, 3]
            del m.experts.local_experts[2:]
    names = dict(sharding.named_parameters(share))
    assert "1.layer.mlp.experts.local_experts.3.linear_fc2.weight" in names
    assert "1.layer.mlp.experts.local_experts.0.linear_fc2.weight" not in names
    init_parameters(share, cfg, seed=1)
    want = dict(sharding.named_parameters(whole))
    for name, p in names.items():
        assert torch.equal(p, want[name]), name
