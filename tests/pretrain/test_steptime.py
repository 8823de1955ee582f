"""pretrain/steptime.py and pretrain.plan's step time: the bubble and communication terms against their closed forms,
the warnings a wasteful layout must raise, and --search's ranking on small cases. (Predicted against measured
step times: bench/steptime_validation.py, figures in bench/RESULTS.md.)"""
import collections
import dataclasses
import math
import subprocess
import sys

import pytest

from conftest import LAYOUT_SAVE_AT, ROOT
from pretrain import steptime
from pretrain.config import preset
from pretrain.engine import zero_auto
from pretrain.parallel import LayoutError
from pretrain.plan import PlanInput, plan, search
from pretrain.sharding import stage_parameters


def _input(**kw):
    base = dict(cfg=preset("7b", seq_length=4096), tp=1, pp=1, dp=1, zero=1, micro_batch_size=1, grad_accum=1,
                gpus_per_node=8)
    return steptime.StepInput(**{**base, **kw})


@pytest.mark.parametrize("pp, m", [(2, 1), (4, 1), (4, 12), (8, 64)])
def test_pipeline_bubble_is_the_1f1b_closed_form(pp, m):
    r = steptime.step_time(_input(pp=pp, grad_accum=m))
    b = r["breakdown_s"]
    assert r["bubble_fraction"] == pytest.approx((pp - 1) / (m + pp - 1))
    pipe = b["compute"] + b["tp_comm"] + b["pp_comm"] + b["pipeline_bubble"]
    assert b["pipeline_bubble"] / pipe == pytest.approx((pp - 1) / (m + pp - 1))


def test_ring_collectives_move_the_textbook_volumes():
    link = steptime.Link(bus_gbs=100.0, latency_s=1e-5)
    gb = 1e9
    assert steptime.collective_s("all_reduce", 8, gb, link) == pytest.approx(1e-5 + 2 * 7 / 8 * 0.01)
    assert steptime.collective_s("all_gather", 4, gb, link) == pytest.approx(1e-5 + 3 / 4 * 0.01)
    assert steptime.collective_s("reduce_scatter", 1, gb, link) == 0.0


def test_tensor_parallel_traffic_is_four_all_reduces_per_layer_and_slower_across_nodes():
    cfg = preset("7b", seq_length=4096)
    r = steptime.step_time(_input(tp=8))
    act = 4096 * cfg.hidden_size * 2  # one micro-batch's bf16 activations
    link = steptime.LINKS["nvlink-h100"]
    # 4 per layer, the embedding's and the output layer's; the cross-entropy's 3 of fp32 per token
    n, ce = cfg.num_layers * 4 + 2, 3 * steptime.collective_s("all_reduce", 8, 4096 * 4, link)
    assert r["breakdown_s"]["tp_comm"] == pytest.approx(n * steptime.collective_s("all_reduce", 8, act, link) + ce)
    full = steptime.step_time(_input(tp=8, recompute="full"))  # the recomputed forward's 2 per layer again
    assert full["breakdown_s"]["tp_comm"] == pytest.approx(
        (n + 2 * cfg.num_layers) * steptime.collective_s("all_reduce", 8, act, link) + ce)
    across = steptime.step_time(_input(tp=8, gpus_per_node=4))
    assert across["breakdown_s"]["tp_comm"] > 5 * r["breakdown_s"]["tp_comm"]
    assert any("spans nodes" in w for w in across["warnings"])


def test_deepspeed_bucketing_rules_on_small_cases():
    # gradient buckets flush when the next gradient would overflow: a gradient larger than the bucket goes alone
    assert steptime.bucket_flushes([3, 3, 3], 5) == 3
    assert steptime.bucket_flushes([1, 1, 1, 1, 1], 5) == 1
    assert steptime.bucket_flushes([1, 9, 1, 1], 5) == 3  # [1] [9] [1, 1]
    # the prefetcher takes parameters until their sum reaches its bucket
    assert steptime.prefetch_groups([2, 2, 2, 9, 9], 5) == 3  # [2, 2, 2] [9] [9]
    assert steptime.prefetch_groups([9, 1, 9], 5) == 2  # [9] [1, 9]


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_data_parallel_traffic_per_zero_stage(zero):
    cfg, dp, m = preset("7b", seq_length=4096), 16, 4
    inter = steptime.LINKS["ib-ndr400"]
    psi = cfg.num_params()
    s = _input(dp=dp, zero=zero, grad_accum=m)  # 16 GPUs on 8-GPU nodes: inter-node
    r = steptime.step_time(s)
    dp_comm = [c for c in steptime.inventory(s) if c.group == "dp" and c.why != "the loss" and "norm" not in c.why]
    count = {c.why: c.count for c in dp_comm}
    # every gradient byte reduced once a micro-batch (ZeRO-2/3) or a step (ZeRO-1), in buckets (ZeRO-1/2: 2e8;
    # ZeRO-3 "auto": 4e7 at this h, pretrain/engine.py): at least psi / bucket collectives, at most twice as many
    # (two neighbouring flushes hold more than one bucket), fewer where a tensor larger than the bucket goes alone
    per, bucket = (1 if zero == 1 else m), (2e8 if zero < 3 else 4e7)
    assert s.reduce_bucket == bucket
    largest = max(n for _, n in stage_parameters(cfg, 1, 1, 0))
    assert per * math.ceil(psi / max(bucket, largest)) <= count["gradients"] <= per * (2 * psi / bucket + 1)
    grads = [c for c in dp_comm if c.why == "gradients"][0]
    assert grads.count * grads.nbytes == pytest.approx(per * 2 * psi)  # bf16
    if zero == 3:  # every matrix, the embedding and the output layer fetched once a micro-batch for forward,
        # and again for backward where the parameters fetched since exceed stage3_max_reuse_distance (1e9),
        # coalesced into all-gathers of at least the prefetch bucket (4e7) where tensors are smaller
        layer = cfg.layer_params()
        stays = sum(1 for j in range(cfg.num_layers) if 2 * j * layer <= 1e9)  # the last layers' 4 matrices
        fetched = psi + (cfg.num_layers - stays) * layer
        assert math.ceil(fetched / 1e8) <= count["parameters fetched"] / m <= 2 * (4 * cfg.num_layers + 2)
        assert count["persistent parameters"] == 2 * cfg.num_layers + 1  # the norms
    else:  # the updated parameters all-gathered after the step, per parameter group, in 5e8 buckets
        assert count["parameters"] == math.ceil((psi - (2 * cfg.num_layers + 1) * cfg.hidden_size) / 5e8) + 1
    want = sum(steptime.collective_s(c.op, dp, c.count * c.nbytes, inter, c.count) for c in dp_comm) + \
        sum(steptime.collective_s("all_reduce", dp, c.count * c.nbytes, inter, c.count) for c in steptime.inventory(s)
            if c.group == "dp" and (c.why == "the loss" or "norm" in c.why))
    assert r["breakdown_s"]["dp_comm_total"] == pytest.approx(want)
    assert 0 <= r["breakdown_s"]["dp_comm_exposed"] <= want
    # overlap: ZeRO-2/3 (overlap_comm) hide what the compute covers; ZeRO-1 reduces after the backward
    slow = steptime.step_time(_input(dp=dp, zero=zero, grad_accum=m, overrides={"inter.bus_gbs": 0.5}))
    assert slow["breakdown_s"]["dp_comm_exposed"] > r["breakdown_s"]["dp_comm_exposed"]
    if zero == 1:
        assert r["breakdown_s"]["dp_comm_exposed"] == pytest.approx(want)
    else:
        assert r["breakdown_s"]["dp_comm_exposed"] < want


def test_the_issue_70b_layout_warns_about_its_pipeline():
    r = plan(PlanInput(model=preset("70b"), nodes=64, gpus_per_node=8, tp=8, pp=4, zero=1, micro_batch_size=1,
                       seq_length=4096))
    s = r["speed"]
    assert s["bubble_fraction"] == pytest.approx(0.75)
    assert any("pipeline bubble 75%" in w for w in s["warnings"])
    assert any("too small for the pipeline" in w for w in s["warnings"])
    better = plan(PlanInput(model=preset("70b"), nodes=64, gpus_per_node=8, tp=8, pp=4, zero=1,
                            micro_batch_size=1, global_batch_size=2048, seq_length=4096))
    assert better["speed"]["warnings"] == [] and better["speed"]["mfu"] > 2 * s["mfu"]
    out = subprocess.run([sys.executable, "-m", "pretrain.plan", "--model", "70b", "--nodes", "64",
                          "--gpus-per-node", "8", "--tp", "8", "--pp", "4", "--zero", "1", "--micro-batch-size", "1",
                          "--seq-length", "4096"], cwd=ROOT, capture_output=True, text=True).stdout
    for text in ("pipeline bubble (75% of the pipeline)", "predicted MFU", "warning: pipeline bubble",
                 "its measured error"):
        assert text in out, out


def test_search_ranks_valid_fitting_layouts_by_predicted_speed():
    base = PlanInput(model=preset("1b"), nodes=1, gpus_per_node=8, global_batch_size=64, seq_length=2048)
    rows = search(base, top=50)
    speeds = [r["speed"]["tokens_per_s"] for r in rows]
    assert len(rows) > 10 and speeds == sorted(speeds, reverse=True) and all(r["fits"] for r in rows)
    best = rows[0]["layout"]
    assert best["pp"] == 1 and best["tp"] == 1  # a 1B model on one node: no model parallelism pays
    assert best["global_batch_size"] == 64
    # every ranked layout is one the trainer accepts, and each equals its own plan
    again = plan(dataclasses.replace(base, tp=best["tp"], pp=best["pp"], zero=best["zero_stage"],
                                     micro_batch_size=best["micro_batch_size"], recompute=best["recompute"]))
    assert again["speed"]["tokens_per_s"] == rows[0]["speed"]["tokens_per_s"]
    with pytest.raises(LayoutError, match="--global-batch-size"):
        search(dataclasses.replace(base, global_batch_size=None))
    assert search(PlanInput(model=preset("70b"), nodes=1, gpus_per_node=1, global_batch_size=8)) == []


# The layouts tests/pretrain/test_parallel_equivalence.py runs (shared train_layout runs), and ZeRO-2.
COUNTED = [(2, dict(zero=0)), (2, dict(zero=1)), (2, dict(zero=2)), (2, dict(zero=3)), (2, dict(tp=2, zero=0)),
           (2, dict(pp=2, zero=1)), (4, dict(tp=2, pp=2, zero=1)), (4, dict(tp=2, zero=3)),
           (2, dict(pp=2, zero=1, tie=True)), (2, dict(zero=3, tie=True)),
           # 2 micro-batches per step: ZeRO-3 fetches and reduce-scatters once per step (pretrain/zero3_step.py)
           (2, dict(zero=3, global_batch_size=8))]


def worker_input(nproc: int, layout: dict) -> steptime.StepInput:
    """The planner's input for a train_layout run of this layout (tiny model, micro-batch 2, global batch 4 unless
    the layout says)."""
    tp, pp, zero = layout.get("tp", 1), layout.get("pp", 1), layout.get("zero", 0)
    dp, cfg = nproc // (tp * pp), preset("tiny", tie_embeddings=layout.get("tie", False))
    return steptime.StepInput(cfg=cfg, tp=tp, pp=pp, dp=dp, zero=zero, micro_batch_size=2,
                              grad_accum=layout.get("global_batch_size", 4) // (2 * dp), gpus_per_node=nproc,
                              device="cpu",
                              reduce_bucket=zero_auto("reduce_bucket_size", cfg.hidden_size))  # the worker's "auto"


def calls_of(inventory, s) -> collections.Counter:
    """The torch.distributed calls the planner's collectives are, as CollectiveTracker counts them: (name, ranks in
    the group), 0 ranks for the wait of an asynchronous collective."""
    world, want = s.tp * s.pp * s.dp, collections.Counter()
    for c in inventory:
        if c.op in ("all_reduce", "broadcast"):
            want[c.op, steptime._group_size(s, c.group)] += c.count
        elif c.op == "p2p":  # DeepSpeed's p2p passes no group: the world's
            want["send", world] += c.count // 2
            want["recv", world] += c.count // 2
        else:  # ZeRO's all-gathers and reduce-scatters and the partitioned activations' gather are asynchronous
            want["wait (an asynchronous collective)", 0] += c.count
    if s.tp > 1:  # megatron's column-parallel backward all-reduces are asynchronous too: one wait each
        layers = math.ceil(s.cfg.num_layers / s.pp)
        want["wait (an asynchronous collective)", 0] += s.grad_accum * (2 * layers + 1)
    return want


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", COUNTED, ids=lambda x: str(x))
def test_collective_counts_are_the_calls_of_a_real_run(train_layout, nproc, layout):
    """The planner's inventory of one step's collectives (TP, PP, ZeRO buckets and fetches, the step's norms) is
    what DeepSpeed and megatron-core really call: every torch.distributed call of a step on the loss-owning rank
    (the last pipeline stage), counted by pretrain.monitor.CollectiveTracker, groups of one rank left out."""
    report, s = train_layout(nproc, **layout), worker_input(nproc, layout)
    # the parameters the planner counts for this stage (pretrain.sharding.stage_parameters) are the built ones
    assert report["local_params"] == sum(n for _, n in stage_parameters(s.cfg, s.tp, s.pp, s.pp - 1))
    # every step from 3 (step 2 alone broadcasts ZeRO-3's recorded trace), the one after the fixture's checkpoint
    # and logits dump included (ZeRO-3 fetched less there until pretrain.step.release_gathered)
    for step in sorted(set(report["collectives"]) - {"1", "2"}, key=int):
        got = collections.Counter({tuple(k.rsplit(" ", 1)): v for k, v in report["collectives"][step].items()})
        got = collections.Counter({(name, int(n)): v for (name, n), v in got.items() if int(n) != 1})
        # (the step after the release once fetched the tied embedding, also the output layer's weight, once more;
        # since the "auto" prefetch bucket holds the whole tiny model (issue 32) it joins the one prefetch)
        want = calls_of(steptime.inventory(s, 4), s)
        assert got == want, (step, steptime.inventory(s, 4))


def planned_bytes(s, stage: int) -> collections.Counter:
    """The planner's bytes of one step on a rank of this pipeline stage by (kind, ranks in the group), as
    CollectiveTracker records them: DeepSpeed's p2p passes no group (the world's)."""
    world, want = s.tp * s.pp * s.dp, collections.Counter()
    for c in steptime.inventory(s, 4, stage):  # the worker trains in fp32
        want[c.op, world if c.op == "p2p" else steptime._group_size(s, c.group)] += c.count * c.nbytes
    return want


@pytest.mark.slow
@pytest.mark.parametrize("nproc, layout", COUNTED, ids=lambda x: str(x))
def test_collective_bytes_of_every_rank_are_the_planners(train_layout, nproc, layout):
    """What each rank sends and receives in a step, by kind and group (ZeRO's gathers and reduce-scatters, which
    DeepSpeed issues through references torch's wrappers never see, included; padding counted as sent), is
    inventory()'s byte total for that rank's pipeline stage, the first stage's embedding and pipeline traffic
    included, to the byte. (Mutations tried: ZeRO-3's norms at 4 bytes, the pipeline's loss broadcast of one
    float, one partitioned-activation gather on every stage: each fails here.)"""
    report, s = train_layout(nproc, **layout), worker_input(nproc, layout)
    assert sorted(r["stage"] for r in report["ranks"]) == sorted(list(range(s.pp)) * (nproc // s.pp))
    # release_gathered after the fixture's logits dump released the persistent parameters too: the next step's
    # first fetch gathers them once more
    refetch = collections.Counter({("all_gather", s.dp): sum(c.count * c.nbytes for c in steptime.inventory(s, 4)
                                                             if c.why == "persistent parameters")})
    for rank, r in enumerate(report["ranks"]):
        planned = planned_bytes(s, r["stage"])
        assert planned and all(v > 0 for v in planned.values())
        for step in sorted(set(r["collective_bytes"]) - {"1", "2"}, key=int):
            want = planned + refetch if s.zero == 3 and int(step) == LAYOUT_SAVE_AT + 1 else planned
            got = collections.Counter()
            for key, v in r["collective_bytes"][step].items():
                kind, n = key.rsplit(" ", 1)
                if int(n) > 1:  # groups of one rank left out, as the inventory does
                    got[kind, int(n)] += v
            assert got == pytest.approx(want, abs=0.5) and set(got) == set(want), (rank, r["stage"], step, got, want)
