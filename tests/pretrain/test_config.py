"""pretrain.config: parameter counts from the real megatron-core modules (on the meta device) equal the closed
form; sizes, FLOPs and overrides."""
import pytest

from pretrain.config import PRESETS, ModelConfig, preset


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("tied", [False, True])
def test_preset_parameter_count_matches_formula(meta_model_builder, name, tied):
    cfg = preset(name, tie_embeddings=tied)
    model = meta_model_builder(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == cfg.num_params()


def test_preset_sizes_are_what_their_names_say():
    billions = {"125m": 0.125, "350m": 0.35, "1b": 1.1, "7b": 6.7, "13b": 13.0, "70b": 69.0}
    for name, size in billions.items():
        n = preset(name).num_params() / 1e9
        assert abs(n - size) / size < 0.12, (name, n)


def test_flops_per_token_is_6n_plus_attention():
    cfg = preset("1b")
    dense = 6 * (cfg.num_params() - cfg.padded_vocab_size * cfg.hidden_size)
    assert cfg.flops_per_token(2048) > dense
    assert cfg.flops_per_token(4096) - cfg.flops_per_token(2048) == pytest.approx(
        3 * 4 * cfg.num_layers * 2048 * cfg.hidden_size)


def test_overrides_and_bad_shapes():
    assert preset("1b", num_layers=4).num_layers == 4
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("3b")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        ModelConfig(num_layers=2, hidden_size=100, num_attention_heads=3)
    with pytest.raises(ValueError, match="num_query_groups"):
        ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=3)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"add_bias": True, "num_query_groups": 4}])
def test_parameter_shapes_are_the_built_models(meta_model_builder, overrides):
    """Checkpoints and export take shapes from ModelConfig.parameter_shapes: it must name and shape exactly the
    parameters the model builds."""
    from pretrain.sharding import canonical_name

    cfg = preset("tiny", **overrides)
    built = {canonical_name(n): tuple(p.shape) for n, p in meta_model_builder(cfg).named_parameters()}
    assert cfg.parameter_shapes() == built
