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
    # ZeRO sizes follow the model: buckets h^2 (prefetch 0.9 h^2) between 4e7 and 1e8 elements (issue 32: fewer,
    # larger collectives), small parameters (< 10 h) whole
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (40_000_000, 40_000_000, 20480)
    zero = load_ds_config("ds_configs/zero3.json", layout, clip_grad=0.5, hidden_size=8192)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (8192**2, int(0.9 * 8192**2))
    zero = load_ds_config("ds_configs/zero3.json", layout, clip_grad=0.5, hidden_size=16384)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (100_000_000, 100_000_000)
    with pytest.raises(LayoutError, match="is \"auto\" but no hidden size"):
        load_ds_config("ds_configs/zero3.json", layout, clip_grad=0.5)
    assert load_ds_config("ds_configs/zero3.json", layout, 1.0, fp32=True, hidden_size=64)["bf16"] == \
        {"enabled": False}
    bad = {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 3}}
    with pytest.raises(LayoutError, match="train_micro_batch_size_per_gpu=4 contradicts --micro-batch-size"):
        load_ds_config(bad, layout, 1.0)


def test_zero3_reduce_bucket_capped_at_the_rank_parameters():
    """DeepSpeed allocates ZeRO-3's whole reduce bucket up front: no larger than the rank's parameters."""
    from pretrain.engine import fit_zero3_reduce_bucket, load_ds_config
    from pretrain.sharding import stage_parameters

    layout = validate_layout(TINY, world_size=2, zero_stage=3, micro_batch_size=2, global_batch_size=8)
    cfg = load_ds_config("ds_configs/zero3.json", layout, clip_grad=1.0, hidden_size=TINY.hidden_size)
    fitted = fit_zero3_reduce_bucket(cfg, TINY, layout)
    assert fitted["zero_optimization"]["reduce_bucket_size"] == sum(n for _, n in stage_parameters(TINY, 1, 1, 0))
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 40_000_000  # the caller's dict is left alone
    small = {**cfg, "zero_optimization": {**cfg["zero_optimization"], "reduce_bucket_size": 1000}}
    assert fit_zero3_reduce_bucket(small, TINY, layout) == small


def test_deepspeeds_muon_import_no_longer_imports_inductor():
    """pretrain.compat.defer_deepspeed_muon_compile: every engine imports DeepSpeed's Muon module, whose torch.compile
    decorators imported torch._inductor (1.2-1.4 s per rank per launch); deferred, Muon's functions compile on their
    first call instead, and nothing imports inductor. (Mutation tried: without the deferral the assert fails.)"""
    import subprocess
    import sys

    code = ("import sys, pretrain.compat as c; c.defer_deepspeed_muon_compile()\n"
            "from deepspeed.runtime.zero.muon import original_muon as m\n"
            "assert m.zeropower_via_newtonschulz5.__name__ == 'zeropower_via_newtonschulz5'\n"
            "print('torch._inductor' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-1] == "False"
