"""pretrain.parallel: every invalid layout is refused before anything is built, with the fix in the message."""
import pytest

from pretrain.config import preset
from pretrain.parallel import LayoutError, validate_layout


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
