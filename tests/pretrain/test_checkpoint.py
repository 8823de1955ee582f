"""pretrain.checkpoint: `latest` only ever names a complete checkpoint; keep-last pruning."""
import json

import pytest

from conftest import MAIN, common, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_run(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--train-iters", "8", "--save", tmp / "ckpt",
           "--save-interval", "4", *common(tiny_data, tmp))
    return tmp


def test_checkpoints_are_atomic_and_pruned(zero3_run, tiny_data, tmp_path):
    tmp, _ = zero3_run
    ck = tmp / "ckpt"
    assert (ck / "latest").read_text() == "iter_0000008"
    for tag in ("iter_0000004", "iter_0000008"):
        assert (ck / tag / "complete").exists() and json.loads((ck / tag / "meta.json").read_text())["dp"] == 2
    # a partial checkpoint named by `latest` is refused, not loaded
    (ck / "iter_0000008" / "complete").unlink()
    from pretrain.checkpoint import read_latest

    with pytest.raises(RuntimeError, match="partial"):
        read_latest(str(ck))
    (ck / "iter_0000008" / "complete").write_text("8")
    launch(1, MAIN, "--deepspeed_config", "ds_configs/zero2.json", "--train-iters", "7", "--save", tmp_path / "k",
           "--save-interval", "1", "--keep-last", "2", *common(tiny_data, tmp_path))
    assert sorted(p.name for p in (tmp_path / "k").glob("iter_*")) == ["iter_0000006", "iter_0000007"]
