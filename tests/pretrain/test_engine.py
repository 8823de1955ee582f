"""pretrain.engine: the DeepSpeed config filled from the layout, contradictions refused."""
import pytest

from pretrain.config import preset
from pretrain.parallel import LayoutError, validate_layout

TINY = preset("tiny")


def test_ds_config_auto_fields_and_contradictions(tmp_path):
    from pretrain.engine import load_ds_config

    layout = validate_layout(TINY, world_size=2, zero_stage=3, micro_batch_size=2, global_batch_size=8)
    cfg = load_ds_config("ds_configs/zero3.json", layout, clip_grad=0.5, hidden_size=2048)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) \
        == (2, 2, 8)
    assert cfg["gradient_clipping"] == 0.5
    # ZeRO sizes follow the model (Hugging Face's "auto" rules): buckets h^2, small parameters (< 10 h) whole
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (2048**2, int(0.9 * 2048**2), 20480)
    with pytest.raises(LayoutError, match="is \"auto\" but no hidden size"):
        load_ds_config("ds_configs/zero3.json", layout, clip_grad=0.5)
    assert load_ds_config("ds_configs/zero3.json", layout, 1.0, fp32=True, hidden_size=64)["bf16"] == \
        {"enabled": False}
    bad = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}
    with pytest.raises(LayoutError, match="train_micro_batch_size_per_gpu=4 contradicts --micro-batch-size"):
        load_ds_config(bad, layout, 1.0)
