"""pretrain.step: a non-finite step is skipped for real under every layout. Nothing moves (on every rank, a hash of
every fp32 master weight and both Adam moments is unchanged), Adam's step counter does not advance, the step is
reported skipped, and training goes on from the same weights. Whether the loss or only the gradients are non-finite,
in any micro-batch, on any one rank."""
import json
import math

import pytest

from conftest import WORKERS, launch

pytestmark = pytest.mark.slow

CASES = [  # (ranks, layout flags, --nan STEP:MICRO[:RANK][:grad])
    (2, ["--zero", "0"], "3:0::grad"),  # fp32 ZeRO-0: the case DeepSpeed itself would apply
    (2, ["--zero", "1"], "3:0:1"),  # a NaN loss on one rank only
    (2, ["--zero", "2"], "3:0:0:grad"),  # finite loss, NaN gradients, one rank
    (2, ["--zero", "3"], "3:0::grad"),
    (2, ["--zero", "3", "--bf16"], "3:0:1:grad"),
    (1, ["--zero", "3", "--global-batch-size", "4", "--micro-batch-size", "2"], "3:1::grad"),  # later micro-batch
    (4, ["--zero", "1", "--pp", "2", "--global-batch-size", "8"], "3:1::grad"),  # PP x DP, ZeRO-1
    (2, ["--zero", "0", "--pp", "2"], "3:0::grad"),  # PP x fp32 ZeRO-0 (validate_layout accepts it)
    (2, ["--zero", "0", "--tp", "2", "--bf16"], "3:0:1"),  # bf16 ZeRO-0, TP
]


@pytest.mark.parametrize("n, flags, nan", CASES, ids=lambda x: x if isinstance(x, str) else None)
def test_non_finite_step_changes_nothing_and_training_goes_on(tmp_path, n, flags, nan):
    launch(n, WORKERS / "train_layout.py", *flags, "--steps", "5", "--nan", nan, "--out", tmp_path / "r.json")
    r = json.loads((tmp_path / "r.json").read_text())
    skipped, sums, adam = r["skipped"], r["master_sum"], r["adam_step"]
    assert [s for s, v in skipped.items() if v] == ["3"]
    digests = r["state_digest"]
    assert digests["3"] == digests["2"] and adam["3"] == adam["2"] == 2  # step 3 moved nothing, on any rank
    assert all(a != b for a, b in zip(digests["4"], digests["3"])) and adam["5"] == 4  # training goes on
    assert sums["3"] == sums["2"] and sums["4"] != sums["3"]
    assert all(math.isfinite(r["losses"][s]) for s in ("1", "2", "4", "5"))
    assert all(math.isfinite(v) for v in sums.values())
