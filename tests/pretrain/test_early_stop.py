"""Early stopping and --keep-best (pretrain/early_stop.py, pretrain/checkpoint.py's `best`): the rules alone, then
real 2-rank runs whose stop step the test computes from their own metrics.jsonl."""
import json
import math
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from conftest import (MAIN, ROOT, common, launch, make_conversation, metrics, prepare_conversations, prepare_corpus,
                      spawn_ranks, train_losses)
from pretrain import checkpoint, early_stop
from pretrain.early_stop import EarlyStopError, EarlyStopping


# --------------------------------------------------------------------------------------- the rules
def expected_stop(values: list[tuple[int, float]], patience: int, min_delta: float, mode: str):
    """(stop step or None, best step) from (step, value) evaluations, written apart from EarlyStopping: patience
    counts evaluations since the value last beat the reference by more than min_delta; best is strict."""
    sign = 1 if mode == "min" else -1
    reference = best = None
    since, best_step = 0, None
    for step, value in values:
        if best is None or sign * value < sign * best:
            best, best_step = value, step
        if reference is None or sign * (reference - value) > min_delta:
            reference, since = value, 0
        else:
            since += 1
            if since >= patience:
                return step, best_step
    return None, best_step


@pytest.mark.parametrize("metric, mode", [("val_loss", "min"), ("val_ppl", "min"), ("val_accuracy", "max"),
                                          ("val_arc_easy_acc_norm", "max"), ("val_wikitext_word_perplexity", "min"),
                                          ("val_lambada_acc", "max"), ("val_x_bits_per_byte", "min")])
def test_direction_from_the_name(metric, mode):
    assert early_stop.direction(metric) == mode
    assert early_stop.direction(metric, "max" if mode == "min" else "min") != mode  # the flag wins


def test_an_unknown_metric_asks_for_the_mode():
    with pytest.raises(EarlyStopError, match="--early-stop-mode max or --early-stop-mode min"):
        early_stop.direction("val_mytask_score")


def test_patience_counts_from_the_reference_and_best_is_strict():
    seq = [(2, 5.0), (4, 4.0), (6, 3.95), (8, 3.92), (10, 3.96), (12, 3.80)]
    state = EarlyStopping("val_loss", "min", patience=3, min_delta=0.1)
    verdicts = [state.update({"val_loss": v, "val_ppl": math.exp(v)}, s) for s, v in seq]
    # 3.95 and 3.92 are new bests (kept) but within 0.1 of the reference 4.0: patience runs on; 3.96 ends it
    assert [v.improved for v in verdicts] == [True, True, True, True, False, True]
    assert [v.stop for v in verdicts][:5] == [False, False, False, False, True]
    assert (state.best, state.best_step, state.reference) == (3.80, 12, 3.80)  # and 3.80 moves the reference
    assert expected_stop(seq, 3, 0.1, "min") == (10, 8)
    higher = EarlyStopping("val_accuracy", "max", patience=1)
    assert not higher.update({"val_accuracy": 0.5}, 1).stop and higher.update({"val_accuracy": 0.5}, 2).stop


def test_state_survives_a_checkpoint_only_for_the_same_metric():
    args = SimpleNamespace(early_stop_patience=2, keep_best=False, early_stop_metric="val_loss",
                           early_stop_mode="auto", early_stop_min_delta=0.0)
    state = EarlyStopping.from_args(args, None)
    state.update({"val_loss": 3.0}, 4)
    state.update({"val_loss": 3.5}, 8)
    saved = json.loads(json.dumps(state.state_dict()))  # as meta.json holds it
    again = EarlyStopping.from_args(args, saved)
    assert again.state_dict() == state.state_dict()
    assert again.update({"val_loss": 3.2}, 12).stop  # counts on: the second evaluation without improvement
    args.early_stop_metric = "val_accuracy"
    assert EarlyStopping.from_args(args, saved).best is None


@pytest.mark.parametrize("change, message", [
    ({"eval_interval": 0}, "--eval-interval"), ({"keep_best": True, "save": None}, "pass --save"),
    ({"early_stop_patience": 0}, "1 or more"), ({"early_stop_metric": "loss"}, "a validation scalar"),
    ({"early_stop_metric": "val_tiny_mc_acc"}, "pass --eval-tasks"),
    ({"early_stop_metric": "val_tiny_mc_score", "eval_tasks": ["tiny_mc"]}, "--early-stop-mode")])
def test_options_that_do_not_fit_are_refused_naming_the_fix(change, message):
    args = SimpleNamespace(early_stop_patience=2, keep_best=False, early_stop_metric="val_loss",
                           early_stop_mode="auto", early_stop_min_delta=0.0, eval_interval=4, save="ck",
                           eval_tasks=None)
    early_stop.check_options(args)
    for k, v in change.items():
        setattr(args, k, v)
    with pytest.raises(EarlyStopError, match=message):
        early_stop.check_options(args)


def fake_tag(save_dir, iteration: int, value: float | None, metric="val_loss", mode="min"):
    """A complete tag of no files whose meta.json records its own evaluation (or none)."""
    tag_dir = save_dir / checkpoint.tag_name(iteration)
    tag_dir.mkdir(parents=True)
    state = {"metric": metric, "mode": mode, "last_step": iteration if value is not None else None,
             "last_value": value}
    (tag_dir / checkpoint.META).write_text(json.dumps({
        "format": checkpoint.FORMAT, "iteration": iteration, "consumed_samples": 0, "layout": {}, "model_config": {},
        "files": {}, "trainer_state": {"early_stop": state}}))
    (tag_dir / checkpoint.COMPLETE).write_text(str(iteration))


def test_best_is_never_pruned_and_a_broken_best_falls_back_to_the_best_recorded(tmp_path, capsys):
    for it, value in [(2, 3.0), (4, 2.5), (6, None), (8, 2.7)]:
        fake_tag(tmp_path, it, value)
    (tmp_path / "best").write_text("iter_0000004")
    checkpoint._prune(str(tmp_path), keep_last=1, keep="iter_0000008")
    assert checkpoint.complete_tags(str(tmp_path)) == ["iter_0000004", "iter_0000008"]
    assert checkpoint.resolve_tag(str(tmp_path), "best").endswith("iter_0000004")
    fake_tag(tmp_path, 2, 3.0)
    (tmp_path / "iter_0000004" / checkpoint.COMPLETE).unlink()  # best names a tag that is not whole
    assert checkpoint.resolve_tag(str(tmp_path), "best").endswith("iter_0000008")  # 2.7 beats 3.0
    assert "names iter_0000004, which is damaged or gone" in capsys.readouterr().out
    (tmp_path / "best").unlink()
    assert checkpoint.resolve_tag(str(tmp_path), "best").endswith("iter_0000008")
    assert "best is missing" in capsys.readouterr().out
    for it in (2, 8):
        (tmp_path / checkpoint.tag_name(it) / checkpoint.COMPLETE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="pass --tag iter_NNNNNNN"):
        checkpoint.resolve_tag(str(tmp_path), "best")


# --------------------------------------------------------------------------------------- real runs
ES_ITERS, PATIENCE, MIN_DELTA = 40, 2, 0.02


@pytest.fixture(scope="module")
def two_docs(tiny_tokenizer, tmp_path_factory):
    """Two documents to overfit: at lr 1e-2 the validation loss (on tiny_data) bottoms out near step 8 and climbs."""
    return prepare_corpus(tmp_path_factory.mktemp("two_docs"), tiny_tokenizer, n_docs=2, seed=5)


def es_args(train, valid, tmp, *extra, config="ds_configs/zero3.json"):
    """Evaluate every 2 steps; stop after 2 evaluations without a 0.02 improvement; keep the best; keep-last 1."""
    return ["--deepspeed_config", config, "--fp32", "--train-iters", ES_ITERS, "--save", tmp / "ck",
            "--save-interval", "1000", "--keep-last", "1", *common(train, tmp), "--split", "100,0,0",
            "--valid-data-path", valid, "--lr", "1e-2", "--lr-decay-style", "constant", "--eval-interval", "2",
            "--early-stop-patience", PATIENCE, "--early-stop-min-delta", MIN_DELTA, "--keep-best", *extra]


def evaluations(tmp, key="val_loss") -> list[tuple[int, float]]:
    """(step, value) of every evaluation in metrics.jsonl, in step order (a resumed run's later lines win)."""
    return sorted({r["step"]: r[key] for r in metrics(tmp) if key in r}.items())


def tag(step: int) -> str:
    return checkpoint.tag_name(step)


@pytest.fixture(scope="module")
def stopped_run(two_docs, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stopped")
    out = launch(2, MAIN, *es_args(two_docs, tiny_data, tmp)).stdout
    stop, best = expected_stop(evaluations(tmp), PATIENCE, MIN_DELTA, "min")
    assert stop is not None and 8 <= stop < ES_ITERS and best < stop, (evaluations(tmp), out[-2000:])
    return SimpleNamespace(tmp=tmp, out=out, stop=stop, best=best)


@pytest.mark.slow
def test_the_run_stops_where_its_own_validation_says_and_best_survives_pruning(stopped_run):
    r = stopped_run
    assert max(train_losses(metrics(r.tmp))) == r.stop and f"early stop at iteration {r.stop}:" in r.out
    ck = r.tmp / "ck"
    assert (ck / "latest").read_text() == tag(r.stop) and (ck / "best").read_text() == tag(r.best)
    assert checkpoint.complete_tags(str(ck)) == [tag(r.best), tag(r.stop)]  # --keep-last 1, and best
    meta = checkpoint.read_meta(str(ck / tag(r.best)))["trainer_state"]["early_stop"]
    assert (meta["best_step"], meta["last_value"]) == (r.best, dict(evaluations(r.tmp))[r.best])


@pytest.mark.slow
def test_export_tag_best_is_that_checkpoint(stopped_run, tmp_path):
    def export(*args):
        return subprocess.run([sys.executable, "-m", "pretrain.export", "--load", stopped_run.tmp / "ck", *args],
                              cwd=ROOT, capture_output=True, text=True, check=True)

    for name in ("best", tag(stopped_run.best), "latest"):
        export("--output", tmp_path / name, "--dtype", "float32", *(["--tag", name] if name != "latest" else []))
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in ("best", tag(stopped_run.best),
                                                                                       "latest")}
    assert weights["best"] == weights[tag(stopped_run.best)] and weights["best"] != weights["latest"]


@pytest.mark.slow
def test_a_rerun_after_the_stop_exits_at_once(stopped_run, two_docs, tiny_data):
    rows = len(metrics(stopped_run.tmp))
    out = launch(2, MAIN, *es_args(two_docs, tiny_data, stopped_run.tmp)).stdout
    assert f"this run stopped early at iteration {stopped_run.stop}" in out
    assert len(metrics(stopped_run.tmp)) == rows  # not a step, not an evaluation


@pytest.mark.slow
def test_sigkill_between_evaluations_then_rerun_stops_at_the_same_step_with_the_same_best(stopped_run, two_docs,
                                                                                         tiny_data, tmp_path):
    """Killed after the evaluation before the stop, which found no improvement (patience 2: one more ends the
    run): the checkpoint there must carry that count, or the rerun stops later (a fresh count, mutation-checked)."""
    counted = stopped_run.stop - 2
    procs = spawn_ranks(2, es_args(two_docs, tiny_data, tmp_path, "--save-interval", 2),
                        env={"PRETRAIN_STALL_AT": f"1:{counted + 1}:120"})  # held in step counted + 1
    latest, deadline = tmp_path / "ck" / "latest", time.time() + 240
    while not (latest.exists() and latest.read_text() == tag(counted)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), f"no checkpoint at step {counted}"
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    meta = checkpoint.read_meta(str(tmp_path / "ck" / tag(counted)))["trainer_state"]["early_stop"]
    assert meta["since"] == 1 and meta["best_step"] == stopped_run.best
    out = launch(2, MAIN, *es_args(two_docs, tiny_data, tmp_path, "--save-interval", 2)).stdout
    assert f"resumed from {tmp_path / 'ck' / tag(counted)}" in out
    assert evaluations(tmp_path) == evaluations(stopped_run.tmp)  # fp32: bit-identical
    assert train_losses(metrics(tmp_path)) == train_losses(metrics(stopped_run.tmp))
    assert f"early stop at iteration {stopped_run.stop}:" in out
    assert (tmp_path / "ck" / "best").read_text() == tag(stopped_run.best)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--tp", "2"], ["--pp", "2"], ["--objective", "mlm"]], ids=["tp2", "pp2", "mlm"])
def test_every_rank_stops_at_the_same_step(two_docs, tiny_data, tmp_path, layout):
    """launch() returns only when both ranks exited 0 (a rank left waiting in a collective would time out); an
    encoder (mlm, DP 2) stops on its masked-token validation loss the same way."""
    config = "ds_configs/zero1_pp.json" if "--pp" in layout else "ds_configs/zero3.json"
    out = launch(2, MAIN, *es_args(two_docs, tiny_data, tmp_path, *layout, config=config)).stdout
    stop, best = expected_stop(evaluations(tmp_path), PATIENCE, MIN_DELTA, "min")
    assert stop is not None and max(train_losses(metrics(tmp_path))) == stop
    assert f"early stop at iteration {stop}:" in out and (tmp_path / "ck" / "best").read_text() == tag(best)


@pytest.mark.slow
def test_a_task_metric_where_higher_is_better(tiny_data, task_dir, tmp_path):
    out = launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "16",
                 *common(tiny_data, tmp_path), "--eval-interval", "2", "--eval-tasks", "tiny_mc", "--eval-tasks-dir",
                 task_dir, "--early-stop-metric", "val_tiny_mc_acc_norm", "--early-stop-patience", "1",
                 env={"HF_DATASETS_OFFLINE": "1"}).stdout
    accuracy = evaluations(tmp_path, "val_tiny_mc_acc_norm")
    stop, _ = expected_stop(accuracy, 1, 0.0, "max")
    assert stop is not None and max(train_losses(metrics(tmp_path))) == stop, accuracy
    assert f"early stop at iteration {stop}: val_tiny_mc_acc_norm" in out


@pytest.fixture(scope="module")
def few_conversations(chat_tokenizer, tmp_path_factory):
    """Four conversations to overfit (fine-tuning, --objective sft)."""
    import random

    rng = random.Random(8)
    convs = [make_conversation(rng, answer_words=8, prompt_words=(1, 4), system=0) for _ in range(4)]
    return prepare_conversations(tmp_path_factory.mktemp("few"), chat_tokenizer, convs, max_tokens=65)


@pytest.mark.slow
def test_a_fine_tune_stops_on_its_answer_loss(few_conversations, sft_data, tmp_path):
    """--objective sft: the validation loss over held-out answers decides the stop, as for clm."""
    out = launch(2, MAIN, *es_args(few_conversations, sft_data, tmp_path, "--objective", "sft", "--seq-length",
                                   "64")).stdout
    stop, best = expected_stop(evaluations(tmp_path), PATIENCE, MIN_DELTA, "min")
    assert stop is not None and max(train_losses(metrics(tmp_path))) == stop, evaluations(tmp_path)
    assert f"early stop at iteration {stop}: val_loss" in out and (tmp_path / "ck" / "best").read_text() == tag(best)
