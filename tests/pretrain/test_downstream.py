"""--eval-tasks (pretrain/downstream.py): a local multiple-choice task (the user's YAML and data file, no download)
is scored by the live model during a run on the default config, logged, and equals what lm-eval's own `hf` model
computes for the exported checkpoint: the same accuracy and the same per-request log-likelihoods."""
import json
import subprocess
import sys

import pytest

from conftest import MAIN, ROOT, common, launch, metrics

def test_asking_for_tasks_without_lm_eval_installed_says_how(hide_package, capsys):
    from pretrain import main

    hide_package("lm_eval")
    code = main.main(["--data-path", "nowhere", "--train-iters", "1", "--eval-tasks", "tiny_mc"])
    assert code == 2 and "pip install lm-eval==" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["ds_configs/zero3.json"], ["ds_configs/zero3.json", "--tp", "2"],
                                    ["ds_configs/zero1_pp.json", "--pp", "2"], ["ds_configs/zero3.json", "--cp", "2"]],
                         ids=["default-dp2", "tp2", "pp2", "cp2"])
def test_tasks_during_training_equal_lm_eval_on_the_export(tiny_data, task_dir, tmp_path, layout):
    out = launch(2, MAIN, "--deepspeed_config", *layout, "--fp32", "--train-iters", "8",
                 "--save", tmp_path / "ck", "--eval-tasks", "tiny_mc", "--eval-tasks-dir", task_dir,
                 *common(tiny_data, tmp_path), env={"HF_DATASETS_OFFLINE": "1"}).stdout
    rows = [r for r in metrics(tmp_path) if "val_tiny_mc_acc" in r]
    assert [r["step"] for r in rows] == [4, 8] and "tasks (" in out
    ours = rows[-1]
    scored = [json.loads(line) for line in (tmp_path / "logs" / "downstream" / "step-0000008.jsonl").open()]
    assert len(scored) == 24 * 4

    res = subprocess.run([sys.executable, "-m", "pretrain.export", "--load", str(tmp_path / "ck"), "--output",
                          str(tmp_path / "hf"), "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    theirs = _lm_eval_hf(tmp_path / "hf", task_dir)
    mine = {tuple(s["request"]): s["logprob"] for s in scored}
    worst = max(abs(mine[req] - lp) for req, lp in theirs["logprobs"].items())
    print(f"acc ours {ours['val_tiny_mc_acc']} lm-eval hf {theirs['acc']}; max |log-likelihood diff| {worst:.2e}")
    assert len(theirs["logprobs"]) == len(mine) and worst < 1e-4
    assert ours["val_tiny_mc_acc"] == theirs["acc"] and ours["val_tiny_mc_acc_norm"] == theirs["acc_norm"]
    assert len({round(lp, 3) for lp in mine.values()}) > 24  # real, differing scores (the comparison can fail)


def _lm_eval_hf(hf_dir, task_dir) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    r = simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
                        tasks=["tiny_mc"], task_manager=TaskManager(include_path=str(task_dir),
                                                                    include_defaults=False),
                        log_samples=True, bootstrap_iters=0)
    logprobs = {}
    for sample in r["samples"]["tiny_mc"]:
        for args, resp in zip(sample["arguments"], sample["resps"]):
            logprobs[tuple(args)] = float(resp[0][0])
    metrics = r["results"]["tiny_mc"]
    return {"acc": metrics["acc,none"], "acc_norm": metrics["acc_norm,none"], "logprobs": logprobs}
