"""pretrain.plan: model-state memory against DeepSpeed's own estimators, parameter counts against the presets
and the real model, the trainer's layout validation, and the activation coefficients against a fresh
measurement of our layers."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from pretrain.config import PRESETS, preset
from pretrain.parallel import LayoutError, validate_layout
from pretrain.plan import (ACTIVATION_COEFFICIENTS, PlanInput, auto_loss_chunks, plan, rank_params,
                           zero3_live_parameters)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_agree_with_the_presets(name):
    cfg = preset(name)
    assert rank_params(cfg, 1, 1)["per_gpu"] == cfg.num_params()
    # model-parallel ranks: every weight matrix is split, the norms are replicated
    tp, pp = 2, 2
    if cfg.num_attention_heads % tp == 0 and cfg.num_query_groups % tp == 0 and cfg.num_layers % pp == 0:
        split = rank_params(cfg, tp, 1)["per_gpu"]
        replicated = (2 * cfg.num_layers + 1) * cfg.hidden_size
        assert split * tp - (tp - 1) * replicated == cfg.num_params()
        stage = rank_params(cfg, 1, pp)["per_gpu"]
        assert cfg.num_params() / pp < stage < cfg.num_params()


def test_parameter_counts_and_largest_module_agree_with_the_built_model(meta_model_builder):
    from deepspeed.runtime.zero.stage3 import model_to_params  # what DeepSpeed's *_all_live estimators count

    for cfg in (preset("tiny"), preset("tiny", tie_embeddings=True),
                preset("tiny", num_layers=3, hidden_size=96, num_attention_heads=6, num_query_groups=3,
                       ffn_hidden_size=200, vocab_size=1000)):
        total, largest = model_to_params(meta_model_builder(cfg, device="cpu"))
        counts = rank_params(cfg, 1, 1)
        assert (counts["per_gpu"], counts["largest_module"]) == (total, largest), cfg


def _ds_estimate(zero, psi, largest, gpus_per_node, nodes, offload_optimizer, offload_params):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    if zero == 3:
        return estimate_zero3_model_states_mem_needs(psi, largest, gpus_per_node, nodes, offload_optimizer,
                                                     offload_params)[1]
    return estimate_zero2_model_states_mem_needs(psi, gpus_per_node, nodes, offload_optimizer)[1]


@pytest.mark.parametrize("model, nodes, tp, pp, zero, offload_optimizer, offload_params", [
    ("1b", 1, 1, 1, 2, False, False), ("7b", 4, 1, 1, 2, False, False), ("7b", 4, 1, 1, 2, True, False),
    ("1b", 1, 1, 1, 3, False, False), ("7b", 4, 1, 1, 3, False, False), ("13b", 2, 1, 1, 3, True, False),
    ("13b", 2, 1, 1, 3, True, True), ("7b", 4, 2, 1, 3, False, False), ("70b", 16, 8, 1, 3, False, False),
    ("70b", 8, 4, 1, 3, True, True), ("13b", 4, 2, 1, 2, False, False),
])
def test_model_state_memory_agrees_with_deepspeed_estimators(model, nodes, tp, pp, zero, offload_optimizer,
                                                             offload_params):
    """DeepSpeed's estimators see one model-parallel rank's shard replicated over the data-parallel ranks."""
    cfg = preset(model)
    r = plan(PlanInput(model=cfg, nodes=nodes, gpus_per_node=8, tp=tp, pp=pp, zero=zero, micro_batch_size=1,
                       seq_length=2048, offload_optimizer=offload_optimizer, offload_params=offload_params))
    counts = rank_params(cfg, tp, pp)
    dp = nodes * 8 // (tp * pp)
    ds = _ds_estimate(zero, counts["per_gpu"], counts["largest_module"], dp, 1, offload_optimizer, offload_params)
    assert r["model_states_bytes"] == pytest.approx(ds, rel=1e-6, abs=8)


def test_zero1_keeps_whole_bf16_gradients_more_than_zero2():
    cfg = preset("7b")
    one, two = (plan(PlanInput(model=cfg, nodes=2, zero=z, micro_batch_size=1)) for z in (1, 2))
    psi, dp = rank_params(cfg, 1, 1)["per_gpu"], 16
    assert one["model_states_bytes"] - two["model_states_bytes"] == pytest.approx(2 * psi * (1 - 1 / dp), abs=8)


@pytest.mark.parametrize("kw", [
    dict(model="7b", nodes=1, tp=3),  # 32 heads not divisible by 3 (and 8 GPUs not by 3)
    dict(model="7b", nodes=1, tp=2, pp=2, zero=3),  # ZeRO-3 with pipeline parallelism
    dict(model="70b", nodes=1, tp=16),  # more TP than GPUs
    dict(model="1b", nodes=1, tp=1, micro_batch_size=2, global_batch_size=20),  # 20 % (2 x 8)
    dict(model="1b", nodes=1, recompute="some"),
])
def test_invalid_layouts_refused_with_the_trainers_message(kw):
    kw = {"zero": 1, "pp": 1, "tp": 1, "micro_batch_size": 1, "global_batch_size": None, "recompute": "none", **kw}
    cfg = preset(kw["model"])
    with pytest.raises(LayoutError) as trainer:
        validate_layout(cfg, kw["nodes"] * 8, kw["tp"], kw["pp"], kw["zero"], kw["micro_batch_size"],
                        kw["global_batch_size"], kw["recompute"])
    args = [sys.executable, "-m", "pretrain.plan", "--model", kw["model"], "--nodes", str(kw["nodes"]),
            "--tp", str(kw["tp"]), "--pp", str(kw["pp"]), "--zero", str(kw["zero"]),
            "--micro-batch-size", str(kw["micro_batch_size"]), "--recompute", kw["recompute"]]
    if kw["global_batch_size"]:
        args += ["--global-batch-size", str(kw["global_batch_size"])]
    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and str(trainer.value) in res.stderr, res.stderr


def test_the_issue_command_prints_memory_fit_and_speed():
    res = subprocess.run([sys.executable, "-m", "pretrain.plan", "--model", "7b", "--nodes", "4", "--gpus-per-node",
                          "8", "--gpu", "h100-80gb", "--tp", "2", "--pp", "1", "--zero", "3", "--micro-batch-size", "1",
                          "--seq-length", "4096", "--recompute", "selective"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for text in ("parameters (bf16)", "gradients", "optimizer states", "activations (recompute selective)",
                 "communication buckets", "fits: YES", "tokens/s per GPU", "predicted MFU", "s for 65,536 tokens"):
        assert text in res.stdout, res.stdout


def test_more_recompute_less_memory_and_a_big_model_on_few_gpus_does_not_fit():
    base = dict(model=preset("7b"), nodes=1, zero=3, micro_batch_size=4, seq_length=4096)
    acts = {m: plan(PlanInput(**base, recompute=m))["memory_gib"]["activations"] for m in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"] > 0
    assert not plan(PlanInput(model=preset("70b"), nodes=1, zero=1, micro_batch_size=1))["fits"]
    assert plan(PlanInput(model=preset("125m"), nodes=1, zero=1, micro_batch_size=1))["fits"]
    r = plan(PlanInput(model=preset("1b"), nodes=2, zero=1, micro_batch_size=2))
    # speed (pretrain/steptime.py): the step is the global batch at the predicted rate, shared by the GPUs
    assert r["speed"]["tokens_per_s"] == pytest.approx(16 * r["speed"]["tokens_per_s_per_gpu"], rel=1e-3)
    assert r["speed"]["step_s"] == pytest.approx(32 * 2048 / r["speed"]["tokens_per_s"], rel=1e-2)
    assert r["speed"]["step_s"] == pytest.approx(sum(r["speed"]["breakdown_s"][k] for k in (
        "compute", "tp_comm", "pp_comm", "pipeline_bubble", "dp_comm_exposed", "optimizer")), rel=1e-2)


def test_cpu_activation_coefficients_match_a_fresh_measurement_of_our_layers(tmp_path):
    """What autograd keeps per layer, measured now on CPU, equals what the planner stores for CPU: a change to
    the model (say, a new MLP) that moves activation memory must update the planner too."""
    res = subprocess.run([sys.executable, "bench/activation_memory.py", "--json", str(tmp_path / "a.jsonl")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})
    assert res.returncode == 0, res.stderr[-3000:]
    fitted = json.loads((tmp_path / "a.jsonl").read_text())["fitted"]
    stored = ACTIVATION_COEFFICIENTS["cpu"]
    for mode, coef in fitted.items():
        for k, v in coef.items():
            assert v == pytest.approx(stored[mode].get(k, 0), abs=0.05), (mode, k, v)


def test_sequence_parallel_divides_the_per_token_activations_by_tp():
    base = dict(model=preset("7b"), nodes=1, tp=4, zero=1, micro_batch_size=1, seq_length=4096, recompute="none")
    without, with_sp = (plan(PlanInput(**base, sequence_parallel=sp))["memory_gib"]["activations"]
                        for sp in (False, True))
    assert 0.4 * without < with_sp < 0.95 * without
    with pytest.raises(LayoutError, match="--sequence-parallel .* needs --tp > 1"):
        plan(PlanInput(**{**base, "tp": 1}, sequence_parallel=True))


def test_mlm_plan_costs_what_clm_costs_and_counts_the_masked_tokens():
    """An mlm encoder computes every position (bidirectional attention, the head over all of them), so memory and
    FLOPs equal the decoder's; the loss counts --mask-prob of the tokens."""
    base = dict(nodes=1, gpus_per_node=8, micro_batch_size=2, seq_length=2048)
    clm = plan(PlanInput(model=preset("1b"), **base))
    mlm = plan(PlanInput(model=preset("1b", objective="mlm"), mask_prob=0.3, **base))
    assert mlm["memory_gib"] == clm["memory_gib"] and mlm["model"] == clm["model"]
    assert mlm["speed"]["objective"] == "mlm" and clm["speed"]["objective"] == "clm"
    assert mlm["speed"]["loss_tokens_per_step"] == round(0.3 * clm["speed"]["loss_tokens_per_step"])
    out = subprocess.run([sys.executable, "-m", "pretrain.plan", "--model", "125m", "--objective", "mlm"], cwd=ROOT,
                         capture_output=True, text=True).stdout
    assert "objective mlm" in out and "masked" in out


@pytest.mark.slow
@pytest.mark.parametrize("max_live, reuse, batch", [(1e9, 1e9, 4), (1e9, 1e9, 8), (100_000, 30_000, 4)],
                         ids=["shipped", "shipped-2-micro-batches", "small"])
def test_zero3_gathered_at_the_forward_end_is_within_the_plans_bound(train_layout, tmp_path, max_live, reuse,
                                                                      batch):
    """ZeRO-3 on DP 2, 16-layer tiny model (655,360 partitioned elements): what is gathered at the end of a
    training forward (tests/workers/train_layout.py) is at most zero3_live_parameters and not far below it. The
    shipped limits keep every parameter: DeepSpeed's 4 x largest module, the plan's step term, is 8x short.
    With 2 micro-batches per step pretrain/zero3_step.py holds the parameters across them: the bound is the same."""
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"].update(stage3_max_live_parameters=max_live, stage3_max_reuse_distance=reuse)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg = preset("tiny", num_layers=16)
    measured = train_layout(2, ds_config=str(tmp_path / "ds.json"), cfg="num_layers=16",
                            global_batch_size=batch)["zero3_window"]
    predicted = zero3_live_parameters(cfg, 1, max_live, reuse)
    print(f"gathered at the forward's end: measured {measured:,}, bound {predicted:,}")
    assert measured <= predicted <= 1.5 * measured
    if max_live == 1e9:
        assert measured > 4 * rank_params(cfg, 1, 1)["largest_module"]


@pytest.mark.slow
def test_loss_memory_with_and_without_chunks_matches_the_allocator_peak(meta_model_builder):
    """The planner's output-layer-and-loss bytes (pretrain.plan.loss_bytes, bf16 as trained) against the peak the
    allocator sees during the head's forward and backward (pretrain.memory.peak_allocated_bytes) at vocabulary
    32k, seq 2048: plain and 4 chunks within 15%, so the plan's saving from --loss-chunks is the real one."""
    import torch

    from pretrain.config import ModelConfig
    from pretrain.memory import head_peak_bytes
    from pretrain.plan import loss_bytes

    meta_model_builder  # noqa: B018  (initialises torch.distributed and megatron's parallel state)
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=32000, seq_length=2048)
    for chunks in (1, 4):
        measured = head_peak_bytes(cfg, chunks, torch.bfloat16)
        planned = loss_bytes(cfg, 1, cfg.seq_length, 1, chunks, "cpu")
        print(f"loss chunks {chunks}: planned {planned / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
        assert abs(planned - measured) <= 0.15 * measured


def test_context_parallel_divides_activations_and_loss_and_keeps_zero_over_dp_x_cp():
    """--cp 2 on the same 8 GPUs: a rank keeps half the activations and the loss's logits (its half of the
    sequence), the same model states (ZeRO partitions over DP x CP = 8 either way), and reports the attention's
    all-to-all bytes; the chunked loss divides the logits again."""
    base = dict(model=preset("1b"), seq_length=8192, zero=3, recompute="selective")
    one, two = plan(PlanInput(**base)), plan(PlanInput(**base, cp=2))
    m1, m2 = one["memory_gib"], two["memory_gib"]
    assert two["layout"]["dp"] == 4 and two["layout"]["cp"] == 2
    assert m2["activations"] == pytest.approx(m1["activations"] / 2, rel=0.02)
    assert m2["output_and_loss"] == pytest.approx(m1["output_and_loss"] / 2, rel=0.02)
    assert m2["optimizer_states"] == m1["optimizer_states"] and m1["cp_all_to_all_per_layer"] == 0
    assert m2["cp_all_to_all_per_layer"] > 0
    chunked = plan(PlanInput(**base, cp=2, loss_chunks=8))["memory_gib"]["output_and_loss"]
    assert chunked < m2["output_and_loss"] / 4
    auto = plan(PlanInput(**base, cp=2, loss_chunks="auto"))["memory_gib"]  # as the trainer picks it
    assert auto["loss_chunks"] == auto_loss_chunks(base["model"].replace(seq_length=8192), 1, 4096, 1, "selective")
    assert auto["loss_chunks"] > 1 and auto["output_and_loss"] < m2["output_and_loss"]
    with pytest.raises(LayoutError, match="--loss-chunks 0: give a whole number from 1"):  # the trainer's message
        plan(PlanInput(**base, loss_chunks=0))
    assert any("--cp 2" in w for w in two["speed"]["warnings"])
