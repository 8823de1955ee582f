"""The loss-spike guard (pretrain/spike_guard.py): the window's rule alone, then real 2-rank runs in which one
step's loss is made to spike (PRETRAIN_INJECT_SPIKE_AT: the final norm's output scaled 30x) and the checkpoints
before and after that step are compared tensor for tensor."""
import statistics

import pytest
from safetensors.torch import load_file

from conftest import MAIN, common, launch, metrics
from pretrain import checkpoint
from pretrain.spike_guard import SpikeGuard, SpikeGuardError


def test_the_threshold_waits_for_a_full_window_and_keeps_the_last_steps():
    guard = SpikeGuard(3.0, 4)
    for loss in (6.0, 5.5, 5.0):
        guard.applied(loss)
        assert guard.threshold() is None  # warm-up
    for loss in (4.8, 4.6):
        guard.applied(loss)
    window = [5.5, 5.0, 4.8, 4.6]
    assert guard.state() == window
    assert guard.threshold() == pytest.approx(statistics.fmean(window) + 3 * statistics.pstdev(window))
    assert SpikeGuard(3.0, 4, saved=[9.0, *window]).state() == window  # resumed: the saved window, cut to size
    with pytest.raises(SpikeGuardError, match="sigma > 0"):
        SpikeGuard(0.0, 4)


def states(tag_dir) -> dict:
    """Every rank's fp32 masters and Adam moments (not its RNG state), and the Adam step."""
    out = {"adam_step": checkpoint.read_meta(str(tag_dir))["adam_step"]}
    for f in sorted(tag_dir.glob("rank*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(f).items() if not k.startswith("rng/")})
    return out


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if k == "adam_step" else bool((a[k] == b[k]).all()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("layout, guard", [(["ds_configs/zero3.json"], True),
                                           (["ds_configs/zero1_pp.json", "--pp", "2"], True),
                                           (["ds_configs/zero3.json"], False)], ids=["dp2", "pp2", "dp2-guard-off"])
def test_a_spike_is_skipped_for_real_and_applied_without_the_guard(tiny_data, tmp_path, layout, guard):
    flags = ["--spike-sigma", "3", "--spike-window", "4"] if guard else []
    # the logits dump at the end reads the pipeline's logits through the loss the guard wrapped
    out = launch(2, MAIN, "--deepspeed_config", *layout, "--fp32", "--train-iters", "8", "--save", tmp_path / "ck",
                 "--save-interval", "1", "--keep-last", "0", *common(tiny_data, tmp_path), *flags,
                 env={"PRETRAIN_INJECT_SPIKE_AT": "7", "PRETRAIN_DUMP_LOGITS": str(tmp_path / "dump.pt")}).stdout
    assert (tmp_path / "dump.pt").stat().st_size > 0
    rows = metrics(tmp_path)
    skipped = {r["step"]: r for r in rows if r.get("skipped")}
    logged = {r["step"]: r["loss"] for r in rows if "lr" in r}  # the loss each step measured, applied or not
    assert logged[7] > 1.5 * max(logged[5], logged[6])  # the injected spike is one
    ck = tmp_path / "ck"
    before, after = states(ck / "iter_0000006"), states(ck / "iter_0000007")
    assert not same(states(ck / "iter_0000005"), before)  # an ordinary step moves every state
    if not guard:  # the same batch, applied: the model moved
        assert not same(before, after) and not skipped and "loss spike" not in out
        return
    assert same(before, after), "the spike step changed a master weight, an Adam moment or the step counter"
    assert list(skipped) == [7] and skipped[7]["spike_loss"] == logged[7]
    assert "iteration      7 | loss spike" in out and "its samples: [24, 28)" in out
    window = checkpoint.read_meta(str(ck / "iter_0000008"))["trainer_state"]["spike_window"]
    assert window == [logged[s] for s in (4, 5, 6, 8)]  # the skipped loss never entered it
    if "--pp" in layout:
        return
    launch(2, MAIN, "--deepspeed_config", *layout, "--fp32", "--train-iters", "9", "--save", ck, "--save-interval",
           "1", "--keep-last", "0", *common(tiny_data, tmp_path), *flags)  # resumed at 8: the window carries over
    logged = {r["step"]: r["loss"] for r in metrics(tmp_path) if "lr" in r}
    window = checkpoint.read_meta(str(ck / "iter_0000009"))["trainer_state"]["spike_window"]
    assert window == [logged[s] for s in (5, 6, 8, 9)]
