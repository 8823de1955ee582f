"""pretrain/monitor.py: the straggler report names the rank that makes the others wait (per pipeline stage, own
work or data wait), the watchdog dumps the stacks of a stalled step naming the stalled function and the
collective in progress, and neither stops a healthy run. End to end on 2 CPU ranks with a rank slowed on purpose
(pretrain/hooks.py)."""
import time

import pytest

from conftest import MAIN, common, launch, metrics
from pretrain.monitor import CollectiveTracker, Watchdog, straggler_lines, summarize


def test_summary_names_the_slow_rank_of_each_stage_only():
    # [step_s, data_wait_s, busy_s, stage]; stage 1 is slower by design (another pipeline stage), not a straggler
    rows = [[1.0, 0.01, 0.30, 0], [1.0, 0.01, 0.31, 0], [1.0, 0.01, 0.62, 0],
            [1.0, 0.01, 0.90, 1], [1.0, 0.01, 0.91, 1], [1.0, 0.50, 0.90, 1]]
    s = summarize(rows, [f"node{i // 2}" for i in range(6)], threshold=0.2)
    assert [(x["rank"], x["what"], x["pp_stage"]) for x in s["stragglers"]] == [(2, "busy_s", 0), (5, "data_wait_s", 1)]
    assert s["stragglers"][0]["host"] == "node1" and s["stragglers"][0]["slower_by"] == pytest.approx(1.0)
    assert s["ranks"]["busy_s"][2] == 0.62
    line = straggler_lines(s)[0]
    assert "rank 2 (node1, pipeline stage 0)" in line and "+100%" in line
    even = [[1.0, 0.01, 0.30 + 0.01 * i, 0] for i in range(4)]
    assert summarize(even, ["h"] * 4, threshold=0.2)["stragglers"] == []  # within the threshold: nobody


def test_tracker_times_collectives_and_knows_the_one_in_progress(meta_model_builder):
    import torch
    import torch.distributed as dist

    original, seen = dist.barrier, {}

    def slow_barrier(*a, **k):  # a collective that waits (for a peer that is late)
        seen["inside"] = tracker.in_progress()
        time.sleep(0.2)
        return original(*a, **k)

    dist.barrier = slow_barrier
    tracker = CollectiveTracker(count=True).install()
    try:
        dist.all_reduce(torch.ones(4))
        assert tracker.current is None and tracker.blocked_s > 0 and tracker.counts == {("all_reduce", 1): 1}
        before = tracker.blocked_s
        dist.barrier()
        assert seen["inside"].startswith("barrier, for") and tracker.blocked_s - before >= 0.2
        assert tracker.in_progress().startswith("none")
    finally:
        tracker.uninstall()
        dist.barrier = original


def test_another_threads_collectives_are_not_the_steps(meta_model_builder):
    """The background checkpoint writer (pretrain/async_save.py) runs collectives on its own group from its own
    thread: the tracker (straggler report, stall watchdog, collective counts) sees only the main thread's."""
    import threading

    import torch
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    tracker = CollectiveTracker(count=True).install()
    try:
        writer = threading.Thread(target=lambda: [dist.all_reduce(torch.ones(8), group=group) for _ in range(3)])
        writer.start()
        writer.join()
        assert tracker.counts == {} and tracker.bytes == {} and tracker.blocked_s == 0
        dist.all_reduce(torch.ones(8))
        assert tracker.counts == {("all_reduce", 1): 1}
    finally:
        tracker.uninstall()


def _sleeping_in_a_step(seconds):
    time.sleep(seconds)


def test_watchdog_dumps_the_stalled_stack_once_and_stops_nothing(tmp_path):
    dog = Watchdog(str(tmp_path), rank=3, tracker=CollectiveTracker(), factor=3, min_seconds=0.2, poll_s=0.05)
    dog.start()
    try:
        for step in (1, 2, 3):  # healthy steps of ~0.02 s: the limit becomes max(0.2, 3 x median) = 0.2 s
            dog.step_started(step)
            time.sleep(0.02)
            dog.step_finished()
        assert dog.limit() == pytest.approx(0.2)
        dog.step_started(4)
        _sleeping_in_a_step(0.1)  # slow but under the limit: nothing
        assert dog.dumps == []
        _sleeping_in_a_step(0.5)
        dog.step_finished()
    finally:
        dog.stop()
    assert [p.split("/")[-1] for p in dog.dumps] == ["stall-rank3-step4.txt"]  # once for the step
    text = (tmp_path / "stall-rank3-step4.txt").read_text()
    assert "rank 3" in text and "step 4 has run" in text and "collective in progress: none" in text
    assert "_sleeping_in_a_step" in text and "test_watchdog_dumps_the_stalled_stack" in text


@pytest.mark.slow
def test_slow_rank_is_named_and_a_stall_is_dumped_on_every_rank(tiny_data, tmp_path):
    """Rank 1 sleeps 0.3 s in every forward pass (its own work), and 15 s in step 6: the straggler report names
    rank 1 at every log interval; the watchdog of rank 1 shows the sleeping frame, rank 0's shows it waiting in a
    collective; the run finishes normally."""
    proc = launch(2, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "8",
                  "--stall-factor", "4", "--stall-min-seconds", "2", *common(tiny_data, tmp_path),
                  "--log-interval", "2", env={"PRETRAIN_SLOW_RANK": "1:0.3", "PRETRAIN_STALL_AT": "1:6:15"})
    out = proc.stdout
    rows = [r for r in metrics(tmp_path) if "ranks" in r]
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8]
    for r in rows[1:]:
        assert [(s["rank"], s["what"]) for s in r["stragglers"]] == [(1, "busy_s")], r
        assert r["ranks"]["busy_s"][1] > r["ranks"]["busy_s"][0] + 0.25  # one forward pass of 0.3 s a step
        assert abs(r["ranks"]["step_s"][1] - r["ranks"]["step_s"][0]) < 0.1 * r["ranks"]["step_s"][0]  # in step
    assert "straggler: rank 1" in out
    stuck = (tmp_path / "logs" / "stall-rank1-step6.txt").read_text()
    waiting = (tmp_path / "logs" / "stall-rank0-step6.txt").read_text()
    assert "_stall_here" in stuck
    assert "collective in progress: none" not in waiting and "collective in progress:" in waiting
    assert "end loss:" in out and sorted(p.name for p in (tmp_path / "logs").glob("stall-*")) == [
        "stall-rank0-step6.txt", "stall-rank1-step6.txt"]
