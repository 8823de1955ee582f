"""--init-from-checkpoint: a new run (fine-tuning, another objective) starts from the weights of one of our
checkpoints saved under any layout, with a fresh optimizer, schedule and data position; once it has saved, a
rerun resumes its own checkpoint instead."""
import pytest
import torch

from conftest import MAIN, common, launch, metrics, train_losses
from pretrain.arguments import parse_args


def test_init_from_checkpoint_refuses_a_second_source_naming_both():
    base = ["--data-path", "d", "--train-iters", "1", "--init-from-checkpoint", "ck"]
    for other in (["--load", "x"], ["--init-from-hf", "x"]):
        with pytest.raises(SystemExit):
            parse_args(base + other)


@pytest.mark.slow
def test_a_tp2_zero3_checkpoint_starts_a_tp1_run_with_its_logits_then_the_run_resumes_itself(tiny_data, tmp_path):
    src, new = tmp_path / "src", tmp_path / "new"
    launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--tp", "2", "--fp32", "--train-iters", "3",
           "--save", src / "ck", *common(tiny_data, src), env={"PRETRAIN_DUMP_LOGITS": str(src / "logits.pt")})
    # iteration 0 of the new run (TP 1, one rank): the weights only, evaluated, saved and dumped before any step
    out = launch(1, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "0",
                 "--init-from-checkpoint", src / "ck", "--save", new / "ck", *common(tiny_data, new),
                 env={"PRETRAIN_DUMP_LOGITS": str(new / "logits.pt")}).stdout
    assert "initialised from" in out and "under TP=2 PP=1 DP=1 ZeRO-3" in out and "at iteration 0" in out, out
    a, b = torch.load(src / "logits.pt"), torch.load(new / "logits.pt")
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-5), (a["logits"] - b["logits"]).abs().max()
    assert (new / "ck" / "latest").read_text() == "iter_0000000"
    # the rerun (a requeue, or more iterations) resumes its own checkpoint: the source is not read again
    out = launch(1, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "2",
                 "--init-from-checkpoint", src / "ck", "--save", new / "ck", *common(tiny_data, new)).stdout
    assert f"--init-from-checkpoint {src / 'ck'} is not read: resuming from" in out, out
    assert sorted(train_losses(metrics(new))) == [1, 2]
    lr_at_1 = [{r["step"]: r["lr"] for r in metrics(d) if "lr" in r}[1] for d in (src, new)]
    assert lr_at_1[0] == lr_at_1[1]  # the schedule started over (warm-up), as the source's did
