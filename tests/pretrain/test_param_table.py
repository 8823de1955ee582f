"""pretrain/param_table.py: the family table is what the model builds, and a parameter without its row fails at
construction, naming it (issue 35's first step). The table's readers (shapes, TP splits, initialisation,
checkpoints, Hugging Face export and import) are exercised by the suites that test them (test_checkpoint_layouts,
test_import_hf, test_export, test_parallel_equivalence), unchanged."""
import dataclasses

import pytest

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
