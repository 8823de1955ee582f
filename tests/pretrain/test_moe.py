"""A mixture of experts trains the same model under every supported layout (pretrain/moe.py): expert parallelism
equal to one process in losses, gradient norms and the routers' auxiliary losses, with ZeRO 1/2/3, recompute, the
document mask and TP x EP; checkpoints resume across EP/TP/DP; the layouts DeepSpeed cannot train are refused.

The reference is one process with gradient accumulation 4 (as in test_parallel_equivalence.py). The auxiliary
losses are weighted high (load balancing 0.1, z-loss 0.01) so that their gradients are visible in the gradient norm:
a test below shows the norm moves when they are off, and their 1/accumulation scaling was mutated once to see the
reference's norm move by 2e-3 (pretrain.moe.set_aux_loss_scale).
"""
import json
import math

import pytest

from conftest import LAYOUT_SAVE_AT, LAYOUT_STEPS, WORKERS, launch
from pretrain.config import preset
from pretrain.parallel import LayoutError, validate_layout

MOE_CFG = "num_experts=4 moe_aux_loss_coeff=0.1 moe_z_loss_coeff=0.01"
REF = dict(cfg=MOE_CFG, micro_batch_size=2, global_batch_size=8)


def moe_run(train_layout, nproc, **flags):
    return train_layout(nproc, **{**REF, **flags})


def assert_same(run, ref, rtol=1e-5):
    """Losses, gradient norms, aux and z-losses per step, within 1e-5 (relative)."""
    assert len(run["losses"]) == len(ref["losses"]) == LAYOUT_STEPS
    for key, tol in (("losses", rtol), ("grad_norms", rtol)):
        for a, b in zip(run[key], ref[key]):
            assert abs(a - b) <= tol * abs(b), (key, run[key], ref[key])
    for key in ("moe_aux_loss", "moe_z_loss"):
        assert set(run[key]) == set(ref[key]) and len(ref[key]) == LAYOUT_STEPS
        for step, b in ref[key].items():
            assert abs(run[key][step] - b) <= rtol * abs(b), (key, run[key], ref[key])
    assert set(run["moe_dropped"].values()) == {0.0}, run["moe_dropped"]  # dropless, counted


pytestmark = pytest.mark.slow


def test_reference_learns_and_balances(train_layout):
    ref = moe_run(train_layout, 1)
    assert ref["losses"][-1] < ref["losses"][0]
    assert all(1.0 <= v < 2.0 for v in ref["moe_imbalance"].values())  # busiest expert / mean: logged, sane
    assert all(v > 0 for v in ref["moe_aux_loss"].values())


def test_aux_losses_are_in_the_gradient(train_layout):
    """Without the auxiliary losses the same run has other gradient norms: the comparisons below see them."""
    ref = moe_run(train_layout, 1)
    off = train_layout(1, **{**REF, "cfg": "num_experts=4 moe_aux_loss_coeff=0.0"})
    assert "moe_aux_loss" not in off
    assert max(abs(a - b) / b for a, b in zip(off["grad_norms"], ref["grad_norms"])) > 1e-3


@pytest.mark.parametrize("nproc, flags", [
    (2, dict(ep=2, zero=1)),
    (4, dict(ep=2, zero=2, recompute="full")),  # expert-data-parallel 2: expert gradients really reduced
    (2, dict(zero=3)),  # EP 1: the experts are ordinary parameters, partitioned by ZeRO-3
    (4, dict(tp=2, ep=2, zero=1, sequence_parallel=True)),  # TP x EP (megatron needs SP with MoE under TP)
    (4, dict(pp=2, ep=2, zero=1)),  # pipeline stages, each with its layers' experts
    (4, dict(cp=2, ep=2, zero=1)),  # context parallel: each CP rank's aux losses a share (pretrain/moe.py)
    (2, dict(cp=2, ep=2, zero=1)),  # EP across the CP ranks of one replica (DP 1), as megatron allows
], ids=["ep2-zero1", "ep2-dp4-zero2-full", "ep1-dp2-zero3", "tp2-ep2-sp-zero1", "pp2-ep2", "cp2-ep2", "cp2-ep2-dp1"])
def test_expert_parallel_matches_one_process(train_layout, nproc, flags):
    assert_same(moe_run(train_layout, nproc, **flags), moe_run(train_layout, 1))


def test_expert_parallel_with_document_mask_and_selective_recompute(train_layout):
    ref = moe_run(train_layout, 1, document_eod=0)
    assert ref["losses"] != moe_run(train_layout, 1)["losses"]  # the mask really changes the model
    assert_same(moe_run(train_layout, 2, ep=2, zero=1, document_eod=0, recompute="selective"), ref)


def test_bf16_optimizer_norms_span_the_expert_tp_shards(train_layout):
    """bf16 with fp32 gradient accumulation (ds_configs/zero1_pp.json, what PP ships with) runs DeepSpeed's
    BF16_Optimizer, whose expert gradient norm sums over TP only when DeepSpeed's expert-TP size says so
    (pretrain/moe.py register_deepspeed_groups): left at 1, TP 2 x EP 2's first-step norm was 3e-3 low. bf16, so
    the bar is bf16's: 1e-3 on the first step's norm (same weights; rounding only), 1e-3 on the losses."""
    flags = dict(ds_config="ds_configs/zero1_pp.json", bf16=True)
    ref = moe_run(train_layout, 1, **flags)
    run = moe_run(train_layout, 4, tp=2, ep=2, sequence_parallel=True, **flags)
    assert abs(run["grad_norms"][0] - ref["grad_norms"][0]) <= 1e-3 * ref["grad_norms"][0], (run, ref)
    assert max(abs(a - b) / b for a, b in zip(run["losses"], ref["losses"])) <= 1e-3


def test_shared_expert_under_tp_and_ep(train_layout):
    """The optional shared expert (every token passes it beside its routed experts) under TP 2 x EP 2."""
    cfg = MOE_CFG + " moe_shared_expert_size=96"
    ref = moe_run(train_layout, 1, cfg=cfg)
    assert ref["local_params"] == preset("tiny", num_experts=4, moe_shared_expert_size=96).num_params()
    assert_same(moe_run(train_layout, 4, cfg=cfg, tp=2, ep=2, zero=1, sequence_parallel=True), ref)


@pytest.mark.parametrize("objective", ["mlm", "sft"])
def test_expert_parallel_trains_the_other_objectives(train_layout, sft_data, objective):
    """The encoder (bidirectional attention on masked tokens) and fine-tuning on packed conversations (answer-only
    loss over the global batch's answer tokens) with experts: EP 2 equals one process."""
    data = dict(objective="mlm") if objective == "mlm" else \
        dict(objective="sft", sft_data=sft_data, global_loss_tokens=True)
    assert_same(moe_run(train_layout, 2, ep=2, zero=1, **data), moe_run(train_layout, 1, **data))


@pytest.mark.parametrize("saved, resumed", [
    ((4, dict(ep=2, zero=2, recompute="full")), (4, dict(tp=2, ep=2, zero=1, sequence_parallel=True))),
    ((4, dict(tp=2, ep=2, zero=1, sequence_parallel=True)), (2, dict(zero=3))),
], ids=["ep2-dp4-to-tp2-ep2", "tp2-ep2-to-ep1-zero3"])
def test_resume_under_another_expert_layout(train_layout, tmp_path, saved, resumed):
    ref = moe_run(train_layout, saved[0], **saved[1])
    flags = {**REF, **resumed[1]}
    args = [a for k, v in sorted(flags.items()) for a in (["--" + k.replace("_", "-")] + ([] if v is True else [v]))]
    launch(resumed[0], WORKERS / "train_layout.py", *args, "--steps", LAYOUT_STEPS, "--load", ref["dir"] / "ck",
           "--out", tmp_path / "r.json")
    got = json.loads((tmp_path / "r.json").read_text())["losses"]
    assert sorted(got, key=int) == [str(s) for s in range(LAYOUT_SAVE_AT + 1, LAYOUT_STEPS + 1)]
    assert max(abs(got[s] - ref["by_step"][s]) / ref["by_step"][s] for s in got) <= 1e-5


@pytest.mark.parametrize("flags, words", [
    (dict(ep=2, zero_stage=0), "clips ZeRO-0 gradients"),
    (dict(ep=2, zero_stage=3), "MoE not supported with Stage 3"),
    (dict(ep=3, zero_stage=1), "does not split into --ep 3"),
    (dict(tp=2, zero_stage=1), "needs --sequence-parallel"),
    (dict(ep=4, tp=2, sequence_parallel=True, zero_stage=1), "must divide the data-parallel size 2"),
    (dict(ep=2, zero_stage=1, compile_layers=True), "--compile with a mixture of experts"),
])
def test_unsupported_expert_layouts_are_refused(flags, words):
    cfg = preset("tiny", num_experts=4)
    with pytest.raises(LayoutError, match=words.replace("(", r"\(")):
        validate_layout(cfg, 4, micro_batch_size=1, **flags)


def test_ep_needs_experts():
    with pytest.raises(LayoutError, match="has none"):
        validate_layout(preset("tiny"), 2, ep=2, zero_stage=1)


MOE_MODEL = preset("tiny", num_experts=4, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)


@pytest.mark.parametrize("nproc, flags", [(2, dict(ep=2, zero=1)), (4, dict(ep=2, zero=2, recompute="full")),
                                          (4, dict(tp=2, ep=2, zero=1, sequence_parallel=True)),
                                          (2, dict(ep=2, zero=1, document_eod=0, recompute="selective"))],
                         ids=["ep2-zero1", "ep2-dp4-zero2", "tp2-ep2-sp", "ep2-selective"])
def test_planner_counts_what_expert_parallel_runs_hold_and_send(train_layout, nproc, flags):
    """pretrain/plan.py against real runs: parameters per rank (num_experts / ep experts), the partitioned
    optimizer states' elements per rank (experts over the expert-data-parallel ranks: the checkpoint file's fp32
    slots), and the bytes handed to all_to_all per step (full or selective recompute re-runs the forward's dispatch
    and combine: half again)."""
    from safetensors import safe_open

    from pretrain.plan import PlanInput, _model_states, moe_all_to_all_bytes, rank_params
    from pretrain.steptime import StepInput, inventory

    run = moe_run(train_layout, nproc, **flags)
    tp, ep = flags.get("tp", 1), flags["ep"]
    dp, counts = nproc // tp, rank_params(MOE_MODEL, tp, 1, ep)
    assert run["local_params"] == counts["per_gpu"]
    p = PlanInput(model=MOE_MODEL, zero=flags["zero"], ep=ep)
    share = _model_states(p, counts["per_gpu"], counts["largest_module"], dp, counts["experts_per_gpu"])["optim"] / 12
    for f in sorted((run["dir"] / "ck" / f"iter_{LAYOUT_SAVE_AT:07d}").glob("rank*.safetensors")):
        with safe_open(f, "pt") as g:
            assert sum(g.get_slice(k).get_shape()[0] for k in g.keys() if k.startswith("fp32/")) == share, f
    sent = sum(v for rank in run["ranks"] for k, v in dict(rank["collective_bytes"])["5"].items()
               if k.startswith("all_to_all"))
    grad_accum = REF["global_batch_size"] // (REF["micro_batch_size"] * dp)
    want = moe_all_to_all_bytes(MOE_MODEL, tp, ep, MOE_MODEL.seq_length, REF["micro_batch_size"],
                                flags.get("sequence_parallel", False), dtype_bytes=4)  # fp32 runs
    want *= MOE_MODEL.num_layers * grad_accum * nproc * (1.5 if flags.get("recompute", "none") != "none" else 1)
    assert sent == want
    # the step-time model's inventory: as many all-to-alls as the loss-owning rank made, and the same bytes
    s = StepInput(cfg=MOE_MODEL, tp=tp, pp=1, dp=dp, zero=flags["zero"], micro_batch_size=REF["micro_batch_size"],
                  grad_accum=grad_accum, recompute=flags.get("recompute", "none"),
                  sequence_parallel=flags.get("sequence_parallel", False), ep=ep)
    a2a = [c for c in inventory(s, dtype_bytes=4) if c.op == "all_to_all"]
    assert sum(c.count for c in a2a) == run["collectives"]["5"][f"all_to_all_single {ep}"]
    assert sum(c.count * c.nbytes for c in a2a) * nproc == sent


def test_planner_reports_total_and_active_parameters():
    from pretrain.plan import PlanInput, plan

    dense = plan(PlanInput(model=preset("1b"), nodes=1, zero=1))
    moe_model = preset("1b", num_experts=8, moe_top_k=2)
    moe = plan(PlanInput(model=moe_model, nodes=1, zero=1, ep=8))
    assert moe["model"]["parameters"] == moe_model.num_params() > dense["model"]["parameters"]
    assert moe["model"]["active_parameters"] == moe_model.active_params() < moe_model.num_params()
    experts = sum(math.prod(shape) for name, shape in moe_model.parameter_shapes().items() if "local_experts" in name)
    assert moe["model"]["expert_parameters_per_gpu"] * 8 == experts  # EP 8: one expert of each layer per GPU
    assert moe["memory_gib"]["expert_all_to_all_per_layer"] > 0
    assert dense["model"]["active_parameters"] == dense["model"]["parameters"]


def test_trainer_logs_routing_and_exports_mixtral(tiny_data, tmp_path):
    """pretrain/main.py with --num-experts and --ep on the shipped ZeRO-1 config: the run log says what the layer
    is, metrics.jsonl carries the aux loss and expert imbalance each step, MFU counts active parameters, and the
    checkpoint exports as Mixtral."""
    from conftest import MAIN, common, metrics

    out = launch(2, MAIN, *common(tiny_data, tmp_path, "--train-iters", 4, "--num-experts", 4, "--moe-top-k", 2,
                                  "--ep", 2, "--deepspeed_config", "ds_configs/zero1.json", "--save", tmp_path / "ck",
                                  "--save-interval", 4, "--sample-prompt", "the", "--sample-tokens", 8)).stdout
    assert "mixture of experts: 4 experts per layer, top-2" in out and "EP=2: 2 experts per rank" in out
    assert "sample: 'the' -> " in out  # generation runs through the experts (eval: all-to-alls of any size)
    assert "dropless" in out
    rows = [r for r in metrics(tmp_path) if "grad_norm" in r]
    assert len(rows) == 4 and all(r["moe_aux_loss"] > 0 and r["moe_imbalance"] >= 1 for r in rows)
    from pretrain.export import main as export_main

    assert export_main(["--load", str(tmp_path / "ck"), "--output", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4


@pytest.mark.parametrize("h, f, experts, k", [(256, 704, 4, 2), (256, 352, 8, 2), (384, 704, 8, 4)])
@pytest.mark.usefixtures("meta_model_builder")  # megatron's parallel state, in this process
def test_planner_activation_memory_of_an_moe_layer_matches_a_measurement(h, f, experts, k):
    """What autograd keeps for one MoE layer (bf16, CPU), measured now, against pretrain.plan's estimate (the dense
    coefficients at k experts' widths plus MOE_COEFFICIENTS): within 3% without recompute; selective recompute
    (megatron's "moe" module) keeps no more than the dense layer's selective."""
    import torch

    from pretrain.memory import layer_saved_bytes
    from pretrain.plan import layer_activation_bytes

    cfg = preset("tiny", hidden_size=h, num_attention_heads=4, num_query_groups=2, moe_ffn_hidden_size=f,
                 num_experts=experts, moe_top_k=k, seq_length=128, num_layers=1)
    for mode, tol in (("none", 0.03), ("selective", 0.001)):
        measured = layer_saved_bytes(h, 4, 2, f, h // 4, 128, 2, mode, torch.device("cpu"), experts=experts, top_k=k)
        predicted = layer_activation_bytes(cfg, 1, 128, 2, mode, "cpu")
        assert abs(measured - predicted) <= tol * measured, (mode, measured, predicted)
