"""pretrain/steptime.py and pretrain.plan's step time: the bubble and communication terms against their closed forms,
the warnings a wasteful layout must raise, and --search's ranking on small cases. (Predicted against measured
step times: bench/steptime_validation.py, figures in bench/RESULTS.md.)"""
import dataclasses
import math
import subprocess
import sys

import pytest

from conftest import ROOT
from pretrain import steptime
from pretrain.config import preset
from pretrain.parallel import LayoutError
from pretrain.plan import PlanInput, plan, rank_params, search


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
    n = cfg.num_layers * 4 + 2
    assert r["breakdown_s"]["tp_comm"] == pytest.approx(n * steptime.collective_s("all_reduce", 8, act, link))
    full = steptime.step_time(_input(tp=8, recompute="full"))  # the recomputed forward's 2 per layer again
    assert full["breakdown_s"]["tp_comm"] == pytest.approx(
        (n + 2 * cfg.num_layers) * steptime.collective_s("all_reduce", 8, act, link))
    across = steptime.step_time(_input(tp=8, gpus_per_node=4))
    assert across["breakdown_s"]["tp_comm"] > 5 * r["breakdown_s"]["tp_comm"]
    assert any("spans nodes" in w for w in across["warnings"])


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_data_parallel_traffic_per_zero_stage(zero):
    cfg, dp, m = preset("7b", seq_length=4096), 16, 4
    inter = steptime.LINKS["ib-ndr400"]
    psi = rank_params(cfg, 1, 1)["per_gpu"]
    r = steptime.step_time(_input(dp=dp, zero=zero, grad_accum=m))  # 16 GPUs on 8-GPU nodes: inter-node
    # bucketed: one latency per bucket (reduce_bucket 5e7 elements, at most one per parameter tensor; 5e8 after the
    # step); ZeRO-3 fetches each of the 4 matrices a layer, the embedding and the output layer twice a micro-batch
    buckets, after = min(6 * cfg.num_layers + 3, math.ceil(psi / 5e7)), math.ceil(psi / 5e8)
    ar = steptime.collective_s("all_reduce", dp, 2 * psi, inter, buckets)
    rs = steptime.collective_s("reduce_scatter", dp, 2 * psi, inter, buckets)
    ag = steptime.collective_s("all_gather", dp, 2 * psi, inter, after)
    fetch = steptime.collective_s("all_gather", dp, 4 * psi, inter, 2 * (4 * cfg.num_layers + 2))
    want = {1: ar + ag, 2: m * rs + ag, 3: m * (fetch + rs)}[zero]
    assert r["breakdown_s"]["dp_comm_total"] == pytest.approx(want)
    assert 0 <= r["breakdown_s"]["dp_comm_exposed"] <= want
    # overlap: the exposed part is what the backward (ZeRO-1/2) or the whole compute (ZeRO-3 prefetch) cannot hide
    slow = steptime.step_time(_input(dp=dp, zero=zero, grad_accum=m, overrides={"inter.bus_gbs": 0.5}))
    assert slow["breakdown_s"]["dp_comm_exposed"] > r["breakdown_s"]["dp_comm_exposed"]


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


def test_zero3_costs_what_was_measured_on_one_gpu():
    """The planner carries today's measured ZeRO-3 host cost (issue 17), so it does not recommend what is slow."""
    one = dict(dp=1, micro_batch_size=4, gpus_per_node=1, cfg=preset("1b", seq_length=2048))
    z1, z3 = steptime.step_time(_input(zero=1, **one)), steptime.step_time(_input(zero=3, **one))
    assert z3["step_s"] / z1["step_s"] == pytest.approx(0.9683 / 0.2011, rel=0.1)
