"""pretrain/metrics.py's sinks: Weights & Biases (offline here) gets the scalars metrics.jsonl gets, from rank 0 only,
as one W&B run across a preemption and the resumed run; wandb is optional, and asking for it without it installed
says how to install it."""


def test_asking_for_wandb_without_it_installed_says_how(hide_package, capsys):
    from pretrain import main

    hide_package("wandb")
    code = main.main(["--data-path", "nowhere", "--train-iters", "1", "--wandb-project", "p"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install wandb==" in err and "--wandb-project p" in err


# One W&B run across a signal to every process and the resumed session: tests/pretrain/test_main.py
# (test_a_signal_to_every_process_saves_and_the_rerun_equals_an_uninterrupted_run).
