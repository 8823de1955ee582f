"""Train the tiny model for a few steps under one parallel layout, on synthetic batches; optionally save a
checkpoint, resume from one, inject a non-finite step, dump the final logits. The rank that owns the loss (last
pipeline stage, first TP and DP rank) writes a JSON report.

Batches depend only on the global step: step k's global batch is drawn from a generator seeded 1000 + k, and the
m-th micro-batch of DP rank r takes sequences [(m*dp + r)*b, (m*dp + r + 1)*b) of it, the order megatron's
sampler uses. So every layout, and a run resumed at any step, sees the same data.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pretrain import checkpoint, zero_state  # noqa: E402
from pretrain.config import preset  # noqa: E402
from pretrain.engine import OptimConfig, build_engine, load_ds_config, zero3_partitioning, zero_stage_of  # noqa: E402
from pretrain.hooks import full_logits, install_poison  # noqa: E402
from pretrain.memory import SavedActivations  # noqa: E402
from pretrain.mlm import MaskingConfig, mask_sample  # noqa: E402
from pretrain.model import ModelOptions  # noqa: E402
from pretrain.monitor import CollectiveTracker  # noqa: E402
from pretrain.parallel import init_distributed, shutdown_distributed, validate_layout  # noqa: E402
from pretrain.step import evaluate, release_gathered, train_step  # noqa: E402


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--cp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert parallel (a mixture of experts: --cfg num_experts=N)")
    p.add_argument("--zero", type=int, default=0)
    p.add_argument("--ds-config", help="a DeepSpeed config file (as shipped) instead of a minimal one")
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--global-batch-size", type=int, default=4)
    p.add_argument("--recompute", default="none")
    p.add_argument("--sequence-parallel", action="store_true")
    p.add_argument("--document-eod", type=int, help="document masking with this EOD id (0 occurs in the batches)")
    p.add_argument("--objective", default="clm", help="mlm: bidirectional attention on masked samples "
                                                        "(pretrain.mlm, mask id 1, special ids 0 and 1)")
    p.add_argument("--varied-loss-mask", action="store_true",
                   help="each sample's loss counts only its last 1..seq_length tokens (length from its index), as "
                        "answer-only fine-tuning does: micro-batches supervise very different numbers of tokens")
    p.add_argument("--global-loss-tokens", action="store_true",
                   help="divide by the global batch's loss tokens (pretrain.step.global_loss_tokens), not a mean "
                        "of micro-batch means")
    p.add_argument("--sft-data", help="a data_prep --format chat directory: micro-batches are its packed conversations "
                                      "(pretrain/sft_data.py, with document ids and answer masks) in sample order")
    p.add_argument("--loss-chunks", type=int, default=1,
                   help="the chunked output layer and loss (pretrain/chunked_loss.py)")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--tie", action="store_true")
    p.add_argument("--steps", type=int, default=5, help="train until this global step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--save", help="checkpoint directory")
    p.add_argument("--save-at", type=int, nargs="*", default=[])
    p.add_argument("--load", help="resume from this checkpoint directory")
    p.add_argument("--nan", help="STEP:MICRO[:RANK][:grad] makes that micro-batch's loss NaN (or, with :grad, "
                                 "its loss finite and its gradients NaN), on one global rank or all")
    p.add_argument("--dump-logits", help="after each save, write the full-vocabulary logits of a fixed batch to "
                                         "this path ({step} is replaced by the step)")
    p.add_argument("--no-load-optimizer", action="store_true", help="resume the weights only (a negative control)")
    p.add_argument("--cfg", nargs="*", default=[], metavar="FIELD=INT",
                   help="model shape over the tiny preset's, e.g. hidden_size=256 (bench/steptime_validation.py)")
    p.add_argument("--count-collectives", action="store_true",
                   help="report each step's torch.distributed calls by name, and the bytes of each kind, on every rank "
                        "(OUT.rank<R>; pretrain.monitor.CollectiveTracker)")
    p.add_argument("--zero3-per-micro-batch", action="store_true",
                   help="PRETRAIN_ZERO3_STEP=0: DeepSpeed's own gather and reduce per micro-batch "
                        "(pretrain/zero3_step.py)")
    p.add_argument("--zero3-reuse-distance", type=float, help="stage3_max_reuse_distance (DeepSpeed's default: 1e9)")
    p.add_argument("--out", required=True)
    return p.parse_args()


def build(a):
    pairs = [kv.split("=") for item in a.cfg for kv in item.split()]  # one argument may hold several
    shape = {k: float(v) if "." in v else int(v) for k, v in pairs}
    cfg = preset("tiny", tie_embeddings=a.tie, objective=a.objective, **shape)
    world = int(os.environ.get("WORLD_SIZE", 1))
    zero = zero_stage_of(a.ds_config) if a.ds_config else a.zero
    layout = validate_layout(cfg, world, a.tp, a.pp, zero, a.micro_batch_size, a.global_batch_size, a.recompute,
                             sequence_parallel=a.sequence_parallel, cp=a.cp, ep=a.ep)
    init_distributed(a.tp, a.pp, seed=7, cp=a.cp, ep=a.ep)
    if a.ds_config:
        ds = load_ds_config(a.ds_config, layout, clip_grad=1.0, fp32=not a.bf16, hidden_size=cfg.hidden_size,
                            sequence_parallel=a.sequence_parallel)
    else:
        # ZeRO-3 sized as the shipped config does ("auto" from the hidden size): every matrix is partitioned.
        auto = {} if zero == 0 else {"reduce_bucket_size": "auto"} if zero < 3 else \
            {k: "auto" for k in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                                 "stage3_param_persistence_threshold")}
        if a.zero3_reuse_distance is not None:
            auto["stage3_max_reuse_distance"] = a.zero3_reuse_distance
        ds = load_ds_config({"zero_optimization": {"stage": zero, **auto}, "bf16": {"enabled": a.bf16}}, layout,
                            clip_grad=1.0, hidden_size=cfg.hidden_size, sequence_parallel=a.sequence_parallel)
    options = ModelOptions(recompute=a.recompute, sequence_parallel=a.sequence_parallel, document_eod=a.document_eod,
                           loss_chunks=a.loss_chunks)
    engine = build_engine(cfg, layout, ds, OptimConfig(lr=a.lr, weight_decay=0.1), options, seed=7)
    return cfg, layout, engine


def global_batch(cfg, layout, step):
    """Learnable sequences (arithmetic progressions mod vocab), so descending loss is visible in 5 steps."""
    gen = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, cfg.vocab_size, (layout.global_batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (layout.global_batch_size, 1), generator=gen)
    seqs = (start + stride * torch.arange(cfg.seq_length + 1)) % cfg.vocab_size
    if EOD is not None:  # document masking: a document boundary every few tokens
        seqs[seqs % 11 == 0] = EOD
    return seqs


EOD = None  # --document-eod
VARIED_MASK = False  # --varied-loss-mask


SFT = None  # --sft-data: a PackedConversations


def micro_batches(cfg, layout, step, dp_rank):
    if SFT is not None:  # global sample k of step s is (s * global batch + k), as pretrain.data's sampler orders them
        from pretrain.data import _collate

        b, base = layout.micro_batch_size, step * layout.global_batch_size
        for m in range(layout.grad_accum_steps):
            first = base + (m * layout.dp + dp_rank) * b
            yield _collate([SFT[i % len(SFT)] for i in range(first, first + b)])
        return
    seqs, b = global_batch(cfg, layout, step), layout.micro_batch_size
    for m in range(layout.grad_accum_steps):
        first = (m * layout.dp + dp_rank) * b
        batch = sample_batch(cfg, seqs[first:first + b], step * layout.global_batch_size + first)
        if VARIED_MASK:
            batch["loss_mask"] = varied_mask(cfg, step * layout.global_batch_size + first, b)
        yield batch


def varied_mask(cfg, first_index, b):
    """Sample i supervises its last k tokens, k from 1 to seq_length by a fixed function of i (the same under any
    layout): the share of supervised tokens differs between micro-batches by up to seq_length x."""
    k = [1 + (i * 7919) % cfg.seq_length if i % 3 else cfg.seq_length for i in range(first_index, first_index + b)]
    return torch.stack([(torch.arange(cfg.seq_length) >= cfg.seq_length - n).float() for n in k])


def sample_batch(cfg, seqs, first_index):
    """clm: next-token pairs; mlm: the first seq_length tokens masked by pretrain.mlm, seeded by sample index."""
    if cfg.objective != "mlm":
        return {"tokens": seqs[:, :-1], "labels": seqs[:, 1:], "loss_mask": torch.ones(len(seqs), cfg.seq_length)}
    masked = [mask_sample(s[:-1].numpy(), MASKING, first_index + i) for i, s in enumerate(seqs)]
    return {k: torch.from_numpy(np.stack([m[k] for m in masked])) for k in ("tokens", "labels", "loss_mask")}


MASKING = MaskingConfig(mask_id=1, special_ids=(0, 1), vocab_size=512, seed=7)


def poison(engine, spec, current):
    """--nan STEP:MICRO[:RANK][:grad]: poison that micro-batch (pretrain.hooks.install_poison)."""
    parts = spec.split(":")
    at_step, at_micro = int(parts[0]), int(parts[1])
    ranks = {int(parts[2])} if len(parts) > 2 and parts[2] not in ("", "grad") else None
    mode = "grad" if parts[-1] == "grad" else "loss"
    install_poison(engine, lambda: (current["step"], mode if current["step"] == at_step else None), ranks, at_micro)


def owns_loss(layout) -> bool:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0 and \
        ps.get_pipeline_model_parallel_rank() == layout.pp - 1


def dump(engine, cfg, layout, path, owner):
    """Full-vocabulary logits of a fixed micro-batch (one no step ever trains on)."""
    batch = sample_batch(cfg, global_batch(cfg, layout, 10**6)[: layout.micro_batch_size], 10**6)
    if SFT is not None:  # conversations with their document ids (the pipeline's activations carry them)
        batch = next(micro_batches(cfg, layout, 10**6, 0))
    logits = full_logits(engine, batch)
    if owner:
        torch.save({"tokens": batch["tokens"], "logits": logits}, path)


def master_sum(engine) -> float:
    """Sum of every fp32 master weight this layout holds (each slot once), over all ranks: unchanged iff no
    parameter moved."""
    total = torch.zeros(1, dtype=torch.float64)
    for slot in zero_state.slots(engine):
        if not slot.replicated or _dp_rank() == 0:
            total += zero_state.read(engine, slot, "fp32").double().sum()
    torch.distributed.all_reduce(total)
    return total.item()


def state_digest(engine) -> list[str]:
    """Per rank, a hash of every optimizer slot's fp32 master weights and both Adam moments, as bytes: equal iff
    not one element of them changed. Every rank's digest, in rank order."""
    import hashlib

    h = hashlib.sha256()
    for slot in zero_state.slots(engine):
        for state in zero_state.STATES:
            h.update(zero_state.read(engine, slot, state).detach().float().contiguous().numpy().tobytes())
    digests = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(digests, h.hexdigest())
    return digests


def _dp_rank():
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank(with_context_parallel=True)  # ZeRO's group: one of them holds a replicated slot


def zero3_window_meter(engine, report) -> dict:
    """ZeRO-3: report["zero3_window"], the most partitioned-parameter elements left gathered at the end of a
    training forward (from step 2, once DeepSpeed has its trace), what pretrain.plan.zero3_reuse_window predicts."""
    state = {"step": 0}
    if not any(hasattr(p, "ds_status") for p in engine.module.parameters()):
        return state

    def at_forward_end(module, inputs, output):
        if state["step"] >= 1 and module.training:  # from the second step (step is set after the first)
            n = sum(p.ds_numel for p in engine.module.parameters()
                    if not p.ds_persist and p.ds_status.name != "NOT_AVAILABLE")
            report["zero3_window"] = max(report.get("zero3_window", 0), n)
            by_step = report.setdefault("zero3_window_by_step", {})
            by_step[state["step"] + 1] = max(by_step.get(state["step"] + 1, 0), n)

    engine.module.register_forward_hook(at_forward_end)
    return state


def main():
    global EOD, VARIED_MASK, SFT
    a = parse()
    EOD, VARIED_MASK = a.document_eod, a.varied_loss_mask
    if a.zero3_per_micro_batch:
        os.environ["PRETRAIN_ZERO3_STEP"] = "0"
    cfg, layout, engine = build(a)
    if a.sft_data:
        from pretrain import sft_data

        conversations = sft_data.Conversations(sft_data.conversation_shards(a.sft_data))
        SFT = sft_data.PackedConversations(conversations, cfg.seq_length, seed=3, num_samples=0, pad_id=0)
    from megatron.core import parallel_state as ps

    start = 0
    if a.load:
        tag_dir = checkpoint.find_resume(a.load)
        meta = checkpoint.load(engine, tag_dir, layout, cfg.parameter_shapes(), not a.no_load_optimizer)
        start = meta["iteration"]
    dp_rank, current = ps.get_data_parallel_rank(), {"step": 0}
    if a.nan:
        poison(engine, a.nan, current)
    report = {"losses": {}, "grad_norms": {}, "skipped": {}, "master_sum": {start: master_sum(engine)},
              "adam_step": {start: zero_state.adam_step(engine)},
              "param_dtype": str(next(engine.module.parameters()).dtype), **zero3_partitioning(engine),
              "local_params": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()),
              "zero3_decision": engine.zero3_decision.describe() if getattr(engine, "zero3_decision", None) else None}
    tracker = CollectiveTracker(count=True).install() if a.count_collectives else None
    window = zero3_window_meter(engine, report)
    for step in range(start + 1, a.steps + 1):
        batches, current["step"] = micro_batches(cfg, layout, step, dp_rank), step
        if tracker:
            tracker.counts.clear()
            tracker.bytes.clear()
        t0 = time.perf_counter()
        if "activation_bytes" not in report:  # the first step's forward passes
            meter = SavedActivations(engine.module)
            with meter.measure():
                r = train_step(engine, batches, a.global_loss_tokens)
            report["activation_bytes"] = meter.bytes
        else:
            r = train_step(engine, batches, a.global_loss_tokens)
        report.setdefault("step_s", {})[step] = time.perf_counter() - t0  # the planner's step-time validation
        if tracker:
            report.setdefault("collectives", {})[step] = {f"{name} {size}": n for (name, size), n in
                                                          tracker.counts.items()}
            report.setdefault("collective_bytes", {})[step] = {f"{kind} {size}": n for (kind, size), n in
                                                               tracker.bytes.items()}
        window["step"] = step
        report["losses"][step], report["grad_norms"][step], report["skipped"][step] = r.loss, r.grad_norm, r.skipped
        for key, value in r.extra.items():  # a mixture of experts' aux loss and expert imbalance
            report.setdefault(key, {})[step] = value
        report["master_sum"][step], report["adam_step"][step] = master_sum(engine), zero_state.adam_step(engine)
        if a.nan and step >= 2:  # Adam's moments exist from the first applied step on
            report.setdefault("state_digest", {})[step] = state_digest(engine)
        if a.save and step in a.save_at:
            checkpoint.save(engine, a.save, step, step * layout.global_batch_size, layout, cfg.__dict__,
                            {"worker": vars(a)}, keep_last=10)
            if a.dump_logits:
                dump(engine, cfg, layout, a.dump_logits.format(step=step), owns_loss(layout))
                release_gathered(engine)  # as pretrain/main.py does after its evaluations
    # held-out batches (never trained on): loss and top-1 accuracy over the loss-counted tokens
    report["eval"] = evaluate(engine, micro_batches(cfg, layout, 10**6 + 1, dp_rank), layout.grad_accum_steps,
                              a.global_loss_tokens)
    if getattr(engine, "zero3_decision", None):  # pretrain/zero3_step.py's cached walks are still the fresh ones
        from pretrain.zero3_step import walks_match

        report["zero3_walks_match"] = walks_match(engine.module)
    if owns_loss(layout):
        with open(a.out, "w") as f:
            json.dump(report, f)
    if tracker:  # every rank's bytes, for the first pipeline stage's inventory too
        with open(f"{a.out}.rank{torch.distributed.get_rank()}", "w") as f:
            json.dump({"stage": ps.get_pipeline_model_parallel_rank(), "tp_rank": ps.get_tensor_model_parallel_rank(),
                       "dp_rank": dp_rank, "collective_bytes": report.get("collective_bytes", {})}, f)
    torch.distributed.barrier()
    shutdown_distributed()


if __name__ == "__main__":
    main()
