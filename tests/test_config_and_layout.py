"""Presets: parameter counts from the real megatron-core modules (on the meta device) equal the closed form;
every invalid layout is refused before anything is built."""
import pytest
import torch

from pretrain.config import PRESETS, ModelConfig, preset
from pretrain.parallel import LayoutError, validate_layout


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


TINY = preset("tiny")


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=6, tp=4), "not divisible by tp\\*pp"),
    (dict(world_size=8, tp=8), "num_attention_heads=4 is not divisible by --tp 8"),
    (dict(world_size=4, tp=4), "num_query_groups=2 is not divisible by --tp 4"),
    (dict(world_size=3, pp=3), "num_layers=2 is not divisible by --pp 3"),
    (dict(world_size=4, pp=2, zero_stage=3), "cannot run with ZeRO stage 3.*zero1_pp.json"),
    (dict(world_size=4, pp=2, zero_stage=2), "cannot run with ZeRO stage 2"),
    (dict(world_size=4, micro_batch_size=2, global_batch_size=6), "not divisible by micro-batch-size x data"),
    (dict(world_size=2, recompute="some"), "--recompute must be one of"),
    (dict(world_size=2, zero_stage=4), "ZeRO stage must be 0-3"),
])
def test_invalid_layouts_are_refused(kwargs, message):
    with pytest.raises(LayoutError, match=message):
        validate_layout(TINY, **kwargs)


def test_valid_layout_arithmetic():
    layout = validate_layout(TINY, world_size=8, tp=2, pp=2, zero_stage=1, micro_batch_size=2,
                             global_batch_size=16)
    assert (layout.dp, layout.grad_accum_steps) == (2, 4)


def test_ds_config_auto_fields_and_contradictions(tmp_path):
    from pretrain.engine import load_ds_config

    layout = validate_layout(TINY, world_size=2, zero_stage=3, micro_batch_size=2, global_batch_size=8)
    cfg = load_ds_config("ds_configs/zero3.json", layout, clip_grad=0.5)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (2, 2, 8)
    assert cfg["gradient_clipping"] == 0.5
    bad = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}
    with pytest.raises(LayoutError, match="train_micro_batch_size_per_gpu=4 contradicts --micro-batch-size"):
        load_ds_config(bad, layout, 1.0)


def test_speedups_compute_the_same_layer(meta_model_builder):
    """--fused-swiglu and --compile change kernels, not results."""
    from pretrain.model import apply_speedups

    cfg = preset("tiny", num_layers=1)
    torch.manual_seed(0)
    eager = meta_model_builder(cfg, device="cpu")
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fast = meta_model_builder(cfg, device="cpu")
    fast.load_state_dict(eager.state_dict())
    apply_speedups(fast, compile_layers=True, fused_swiglu=True)
    block = fast.get_submodule("1")
    assert block.layer.config.bias_activation_fusion and "_layer" in vars(block)  # really switched on
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    losses = []
    for model in (eager, fast):
        loss = model(tokens, tokens.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
