"""--async-save (pretrain/async_save.py): the same files as a synchronous save, written behind the loop; a rank killed
while the writer runs leaves `latest` on the previous tag; SIGTERM during a background save waits for it; a full
disk in the background stops the run with the synchronous save's exit code, nothing partial left complete."""
import os
import signal

import pytest
from safetensors import safe_open

from conftest import MAIN, common, full_disk_run, launch, metrics, spawn_ranks, train_losses, wait_for_step
from pretrain import checkpoint

pytestmark = pytest.mark.slow


def args(data, tmp, *extra):
    return ["--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--save", tmp / "ck", *common(data, tmp),
            *map(str, extra)]


def rank_files(tag_dir) -> dict:
    """Every rank file's tensors (as bytes) and safetensors metadata."""
    out = {}
    for name in sorted(os.listdir(tag_dir)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(tag_dir, name), "pt") as f:
                out[name] = ({k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, f.metadata())
    return out


def comparable_meta(tag_dir) -> dict:
    """meta.json but the save time, and the run config's paths and the --async-save flag (which differ by design)."""
    meta = checkpoint.read_meta(str(tag_dir))
    meta.pop("saved_at")
    meta["run_config"] = {k: v for k, v in meta["run_config"].items()
                          if k not in ("save", "log_dir", "async_save", "tokenizer_path")}
    return meta


@pytest.mark.parametrize("layout", [["--tp", "2"], []], ids=["tp2", "zero3-dp2"])
def test_an_async_save_writes_the_synchronous_files_and_resumes_bit_identically(tiny_data, tmp_path, layout):
    runs = {}
    for mode in ("sync", "async"):
        tmp = tmp_path / mode
        out = launch(2, MAIN, *args(tiny_data, tmp, "--train-iters", 6, "--save-interval", 3, *layout,
                                    *(["--async-save"] if mode == "async" else []))).stdout
        runs[mode] = (tmp, out)
    tmp, out = runs["async"]
    assert "in the background" in out and "saved checkpoint" in out, out[-2000:]
    blocked = [r for r in metrics(tmp) if "save_blocked_s" in r]
    assert [(r["step"], r["save_background"]) for r in blocked] == [(3, True), (6, True)]  # the end waits for 6
    for tag in ("iter_0000003", "iter_0000006"):
        a, b = (runs[m][0] / "ck" / tag for m in ("sync", "async"))
        assert rank_files(a) == rank_files(b) and comparable_meta(a) == comparable_meta(b)
    assert train_losses(metrics(runs["sync"][0])) == train_losses(metrics(tmp))  # the loop computed the same
    # the host memory the planner reports for --async-save is each rank's snapshot: its file's state tensors
    from pretrain.config import ModelConfig
    from pretrain.plan import PlanInput, plan

    meta = checkpoint.read_meta(str(tmp / "ck" / "iter_0000003"))
    predicted = plan(PlanInput(model=ModelConfig(**meta["model_config"]), nodes=1, gpus_per_node=2,
                               tp=meta["layout"]["tp"], micro_batch_size=2, global_batch_size=4, seq_length=32,
                               async_save=True))["checkpoint_bytes_per_gpu"]
    held = [sum(len(v) for k, v in tensors.items() if not k.startswith("rng"))
            for tensors, _ in rank_files(tmp / "ck" / "iter_0000003").values()]
    assert abs(max(held) - predicted) <= 0.03 * predicted, (held, predicted)
    # resuming from the background-written tag: the uninterrupted run's losses, bit for bit
    again = tmp_path / "again"
    launch(2, MAIN, *args(tiny_data, again, "--train-iters", 6, "--load", tmp / "ck" / "iter_0000003", *layout))
    want, got = train_losses(metrics(tmp)), train_losses(metrics(again))
    assert [got[s] for s in (4, 5, 6)] == [want[s] for s in (4, 5, 6)]


def assert_rerun_continues(data, ref, run, flags, start: int, end: int) -> str:
    """Rerun `run`: it resumes and from `start` + 1 on its losses are the reference's, bit for bit."""
    out = launch(2, MAIN, *args(data, run, *flags)).stdout
    want, got = train_losses(metrics(ref)), train_losses(metrics(run))
    assert [got[s] for s in range(start + 1, end + 1)] == [want[s] for s in range(start + 1, end + 1)]
    return out


def interrupted(data, tmp_path, flags, slow_save: str, at_step: int, sig, ranks=(0, 1)) -> tuple:
    """A reference run, then the same run with PRETRAIN_SLOW_SAVE=slow_save sent `sig` on `ranks` once it has
    logged `at_step` -> (reference dir, run dir, the run's processes)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(2, MAIN, *args(data, ref, *flags))
    procs = spawn_ranks(2, args(data, run, *flags), env={"PRETRAIN_SLOW_SAVE": slow_save})
    wait_for_step(run, at_step, procs)
    for r in ranks:
        procs[r].send_signal(sig)
    return ref, run, procs


def test_a_rank_killed_while_the_writer_runs_leaves_latest_on_the_previous_tag(tiny_data, tmp_path):
    """The save of 4 writes its files, then (PRETRAIN_SLOW_SAVE) holds its commit 10 s while training goes on to
    step 6, whose save waits for it: SIGKILL rank 1 there. Rank 0's writer finds its peer gone, the save fails
    without a commit, and rank 0 stops as a lost peer stops it (exit 6); the rerun resumes from 2 with the
    reference's losses."""
    flags = ["--train-iters", 8, "--save-interval", 2, "--async-save", "--dist-timeout-minutes", 0.25]
    ref, run, procs = interrupted(tiny_data, tmp_path, flags, "4:10", 6, signal.SIGKILL, ranks=(1,))
    assert procs[0].wait(timeout=120) == 6, procs[0].stdout.read()[-3000:]
    procs[1].wait()
    ck = run / "ck"
    assert (ck / "latest").read_text() == "iter_0000002"
    assert not (ck / "iter_0000004" / checkpoint.COMPLETE).exists()  # its files may be there; never complete
    out = assert_rerun_continues(tiny_data, ref, run, flags, 2, 8)
    assert "at iteration 2" in out, out[-2000:]


def test_sigterm_during_a_background_save_waits_for_it_then_saves_and_exits_3(tiny_data, tmp_path):
    flags = ["--train-iters", 10, "--save-interval", 4, "--async-save"]
    ref, run, procs = interrupted(tiny_data, tmp_path, flags, "4:6", 5, signal.SIGTERM)
    codes = [p.wait(timeout=240) for p in procs]
    out = procs[0].stdout.read()
    assert codes == [3, 3], out[-3000:]
    assert "for the background save of" in out and "(preemption)" in out, out[-3000:]
    stopped = int((run / "ck" / "latest").read_text().split("_")[1])
    assert stopped >= 5 and (run / "ck" / "iter_0000004" / checkpoint.COMPLETE).exists()
    assert_rerun_continues(tiny_data, ref, run, flags, stopped, 10)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_during_a_background_save_exits_5_with_nothing_partial(tiny_data, tmp_path):
    codes, out, entries, tmp_files = full_disk_run(tiny_data, tmp_path, "--async-save")
    assert codes == [5, 5], out[-3000:]
    assert "in the background" in out and "no space left on the filesystem of" in out, out[-3000:]
    assert not any(name.startswith("iter_") for name in entries) and not tmp_files
