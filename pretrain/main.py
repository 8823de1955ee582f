"""Pretraining entry point: `deepspeed pretrain/main.py --deepspeed_config ds_configs/zero3.json [options]`.

config -> parallel state -> model -> engine -> data -> loop. The loop is thin: one optimizer step, logging,
evaluation, checkpoints, and the stop conditions (end, preemption signal, too many non-finite steps).

Exit codes: 0 done; 2 bad arguments; 3 stopped by SIGTERM/SIGUSR1 after saving (requeue me); 4 stopped after
--max-skipped-steps consecutive non-finite steps (a checkpoint of the last good state was saved).
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time

if __package__ in (None, ""):  # `deepspeed pretrain/main.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from pretrain import checkpoint
from pretrain.arguments import MODEL_OVERRIDES, parse_args
from pretrain.config import ModelConfig, preset
from pretrain.parallel import LayoutError, validate_layout

EXIT_PREEMPTED = 3
EXIT_TOO_MANY_SKIPS = 4


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


def _tokenizer_path(args) -> str:
    if args.tokenizer:
        from data_prep.tokenizer import resolve

        return resolve(args.tokenizer)
    from pretrain.data import parse_data_path

    for _, path in parse_data_path(args.data_path):
        manifest = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "manifest.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                return json.load(f)["tokenizer"]["path"]
    raise LayoutError("no --tokenizer given and the first --data-path has no manifest.json naming one")


def model_config(args, vocab_size: int) -> ModelConfig:
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES}
    cfg = preset(args.model, vocab_size=vocab_size, tie_embeddings=args.tie_embeddings or None,
                 seq_length=args.seq_length, **overrides)
    return cfg


class _StopSignal:
    """SIGTERM / SIGUSR1 (Slurm's warning before preemption or the time limit) -> finish the step, save, exit."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """Every rank must stop at the same step: a signal seen by any rank stops all."""
        flag = torch.tensor([1.0 if self.received else 0.0])
        if dist.is_initialized():
            from pretrain.compat import device

            flag = flag.to(device())
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def _nan_injection():
    """Test hook: PRETRAIN_INJECT_NAN_AT=3,4 makes the loss of those steps non-finite."""
    steps = {int(s) for s in os.environ.get("PRETRAIN_INJECT_NAN_AT", "").split(",") if s.strip()}
    return steps


def resolve_resume(load_dir: str | None, layout, ds_config: dict) -> str | None:
    """Where to resume from, converting to a universal checkpoint when the data-parallel size changed.

    Same layout: load as saved. Another DP size: rank 0 converts the checkpoint once (the others wait), and
    DeepSpeed loads the universal form. Another TP/PP: the user converts explicitly (python -m pretrain.convert).
    """
    if not load_dir:
        return None
    meta = checkpoint.read_meta(load_dir)
    if meta is None:
        return None
    saved = (meta["tp"], meta["pp"], meta["dp"])
    if not meta.get("universal") and saved != (layout.tp, layout.pp, layout.dp):
        if (meta["tp"], meta["pp"]) != (layout.tp, layout.pp):
            raise LayoutError(
                f"{load_dir}/{meta['tag']} was saved with TP={meta['tp']} PP={meta['pp']}, this run has "
                f"TP={layout.tp} PP={layout.pp}: convert it first with `python -m pretrain.convert --load "
                f"{load_dir} --output <dir>` and pass --load <dir>")
        universal_dir = os.path.join(load_dir, "universal")
        if _rank0():
            converted = checkpoint.read_meta(universal_dir) if os.path.exists(
                os.path.join(universal_dir, checkpoint.LATEST)) else None
            if not converted or converted["tag"] != meta["tag"]:
                from pretrain.convert import convert

                log(f"data-parallel size changed ({meta['dp']} -> {layout.dp}): converting {meta['tag']} to a "
                    f"universal checkpoint in {universal_dir}")
                convert(load_dir, universal_dir, meta["tag"])
        if dist.is_initialized():
            dist.barrier()
        load_dir, meta = universal_dir, checkpoint.read_meta(universal_dir)
    if meta.get("universal"):
        if layout.zero_stage == 3 and layout.tp > 1:
            raise LayoutError("resuming a universal (converted) checkpoint into ZeRO-3 with TP > 1 is not supported "
                              "by DeepSpeed's ZeRO-3 loader (it cannot re-slice megatron TP shards); resume at "
                              "--tp 1, or with ZeRO-1/2")
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return load_dir


@torch.no_grad()
def _dump_logits(engine, dataset, micro_batch_size: int, path: str) -> None:
    """Test hook (PRETRAIN_DUMP_LOGITS=file): full-vocabulary logits of the trained model, as sharded, on the
    first micro-batch of `dataset`, for comparison with an exported model."""
    from megatron.core import tensor_parallel

    from pretrain.compat import device
    from pretrain.data import micro_batches
    from pretrain.step import is_pipeline

    batch = next(micro_batches(dataset, 0, micro_batch_size, 0, 1, num_workers=0))
    if is_pipeline(engine):  # logits stay on the last stage: record the loss of this micro-batch instead
        feed = iter([(batch["tokens"], (batch["labels"], batch["loss_mask"]))] * 64)
        loss = float(engine.eval_batch(data_iter=feed))
        if _rank0():
            torch.save({"tokens": batch["tokens"], "labels": batch["labels"], "loss": loss}, path)
        return
    engine.eval()
    logits = engine(batch["tokens"].to(device()))
    logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits.float().contiguous())
    engine.train()
    if _rank0():
        torch.save({"tokens": batch["tokens"], "logits": logits.transpose(0, 1).cpu()}, path)


def main(argv=None) -> int:
    from pretrain.data import DataError

    try:
        return _main(argv)
    except (LayoutError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


def _main(argv=None) -> int:
    args = parse_args(argv)
    from data_prep.tokenizer import eod_id, load as load_tokenizer

    tok_path = _tokenizer_path(args)
    tokenizer = load_tokenizer(tok_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    cfg = model_config(args, vocab)
    world = int(os.environ.get("WORLD_SIZE", 1))

    from pretrain.engine import (OptimConfig, build_engine, load_ds_config, repair_after_load,
                                 zero_stage_of)

    layout = validate_layout(cfg, world, args.tp, args.pp, zero_stage_of(args.deepspeed_config),
                             args.micro_batch_size, args.global_batch_size, args.recompute)
    if args.compile and layout.zero_stage == 3:
        raise LayoutError("--compile is supported with ZeRO 0-2: DeepSpeed's ZeRO-3 parameter hooks break "
                          "torch.compile'd layers; drop --compile or use ds_configs/zero2.json")
    stop = _StopSignal()

    from pretrain.parallel import init_distributed

    init_distributed(args.tp, args.pp, args.seed, args.dist_timeout_minutes)
    from megatron.core import parallel_state as ps

    ds_config = load_ds_config(args.deepspeed_config, layout, args.clip_grad)
    if args.fp32:
        ds_config["bf16"] = {"enabled": False}
        ds_config.pop("fp16", None)
    load_dir = resolve_resume(args.load or args.save, layout, ds_config)
    opt = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, beta1=args.adam_beta1, beta2=args.adam_beta2,
                      eps=args.adam_eps, clip_grad=args.clip_grad)
    engine = build_engine(cfg, layout, ds_config, opt, args.recompute, args.seed)
    if args.compile or args.fused_swiglu:
        from pretrain.model import apply_speedups

        apply_speedups(engine.module, args.compile, args.fused_swiglu)

    gbs, seq = layout.global_batch_size, cfg.seq_length
    train_iters = args.train_iters or math.ceil(args.train_tokens / (gbs * seq))
    decay_iters = args.lr_decay_iters or train_iters
    n_evals = train_iters // args.eval_interval + 1 if args.eval_interval else 1
    from pretrain.data import DataConfig, build_datasets, micro_batches

    data_cfg = DataConfig(data_path=args.data_path, split=args.split, seq_length=seq, seed=args.seed,
                          cache_dir=args.data_cache_dir, num_workers=args.num_workers, vocab_size=vocab,
                          eod_id=eod_id(tokenizer, tok_path), valid_data_path=args.valid_data_path,
                          test_data_path=args.test_data_path)
    train_ds, valid_ds, test_ds = build_datasets(
        data_cfg, (train_iters * gbs, n_evals * args.eval_iters * gbs, args.eval_iters * gbs))

    iteration, consumed = 0, 0
    if load_dir:
        state = checkpoint.load(engine, load_dir, load_optimizer=not args.no_load_optim)
        iteration, consumed = state["iteration"], state["consumed_samples"]
        repair_after_load(engine, opt)
        log(f"resumed from {load_dir} at iteration {iteration} ({consumed} samples consumed)")
    dp_rank, dp = ps.get_data_parallel_rank(), layout.dp
    train_iter = micro_batches(train_ds, consumed, layout.micro_batch_size, dp_rank, dp, args.num_workers)

    from pretrain.metrics import MetricsWriter, device_peak_tflops, memory_gb
    from pretrain.schedule import lr_at
    from pretrain.step import eval_loss, train_step

    metrics = MetricsWriter(args.log_dir, args.tensorboard_dir, enabled=_rank0())
    peak, device_name = (args.peak_tflops, "") if args.peak_tflops else device_peak_tflops()
    flops_per_token = cfg.flops_per_token(seq)
    run_config = {**vars(args), "model_config": cfg.__dict__, "world_size": world, "dp": dp,
                  "tokenizer_path": os.path.abspath(tok_path)}
    nan_steps = _nan_injection()

    def evaluate(dataset, name: str) -> dict:
        if dataset is None:
            return {}
        it = micro_batches(dataset, 0, layout.micro_batch_size, dp_rank, dp, num_workers=0, cycle=True)
        loss = eval_loss(engine, it, args.eval_iters * layout.grad_accum_steps)
        out = {f"{name}_loss": loss, f"{name}_ppl": math.exp(min(loss, 50))}
        metrics.write({"step": iteration, "consumed_samples": consumed, **out})
        log(f"iteration {iteration:6d} | {name} loss {loss:.4f} | {name} ppl {out[f'{name}_ppl']:.2f}")
        return out

    saved_at = {"iteration": None}

    def save(reason: str) -> str | None:
        if not args.save or saved_at["iteration"] == iteration:
            return None
        saved_at["iteration"] = iteration
        client = {"iteration": iteration, "consumed_samples": consumed, "run_config": run_config,
                  "world_size": world}
        path = checkpoint.save(engine, args.save, iteration, client, args.keep_last,
                               {"tp": layout.tp, "pp": layout.pp, "dp": dp, "zero_stage": layout.zero_stage,
                                "world_size": world}, add_bias=cfg.add_bias)
        log(f"saved checkpoint {path} ({reason})")
        return path

    log(f"model {args.model}: {cfg.num_params() / 1e6:.2f}M parameters; layout TP={layout.tp} PP={layout.pp} "
        f"DP={dp} ZeRO-{layout.zero_stage}; global batch {gbs} x {seq} tokens, {layout.grad_accum_steps} "
        f"micro-batch(es) of {layout.micro_batch_size} per rank; {train_iters} iterations")
    first_loss, last_loss, skipped_in_a_row, skipped_total = None, None, 0, 0
    last_ckpt, exit_code = None, 0
    window_t0, window_steps = time.time(), 0
    while iteration < train_iters:
        lr = lr_at(iteration, args.lr, args.min_lr, args.warmup_iters, decay_iters, args.lr_decay_style,
                   args.wsd_decay_fraction)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        hook = (lambda loss: loss * float("nan")) if iteration + 1 in nan_steps else None
        t0 = time.time()
        result = train_step(engine, train_iter, loss_hook=hook)
        step_time = time.time() - t0
        iteration += 1
        consumed += gbs
        window_steps += 1
        if result.skipped:
            skipped_in_a_row += 1
            skipped_total += 1
            log(f"iteration {iteration:6d} | non-finite loss or grad norm: step skipped "
                f"({skipped_in_a_row} in a row, {skipped_total} total)")
            metrics.write({"step": iteration, "consumed_samples": consumed, "skipped": True,
                           "skipped_total": skipped_total, "loss": None})
            if skipped_in_a_row >= args.max_skipped_steps:
                log(f"error: {skipped_in_a_row} consecutive non-finite steps (--max-skipped-steps "
                    f"{args.max_skipped_steps}); saving the last good state and stopping. Lower --lr, check "
                    f"the data around sample {consumed - skipped_in_a_row * gbs}, or raise --clip-grad.")
                last_ckpt = save("stopped after non-finite steps") or last_ckpt
                exit_code = EXIT_TOO_MANY_SKIPS
                break
        else:
            skipped_in_a_row = 0
            first_loss = result.loss if first_loss is None else first_loss
            last_loss = result.loss
        if iteration % args.log_interval == 0 or iteration == 1 or iteration == train_iters:
            elapsed = (time.time() - window_t0) / window_steps
            tokens_per_sec = gbs * seq / elapsed
            tflops = flops_per_token * tokens_per_sec / world / 1e12
            record = {"step": iteration, "consumed_samples": consumed, "tokens": consumed * seq,
                      "loss": result.loss, "lr": lr, "grad_norm": result.grad_norm,
                      "tokens_per_sec": tokens_per_sec, "tflops_per_gpu": tflops,
                      "mfu": tflops / peak if peak else None, "step_time": elapsed,
                      "last_step_time": step_time, "mem_gb": memory_gb(), "skipped_total": skipped_total}
            metrics.write(record)
            mfu = f" | MFU {record['mfu']:.1%}" if peak else ""
            log(f"iteration {iteration:6d}/{train_iters} | loss {result.loss:.4f} | lr {lr:.3e} | grad norm "
                f"{result.grad_norm:.3f} | {tokens_per_sec:,.0f} tok/s | {tflops:.2f} TFLOP/s/GPU{mfu} | "
                f"{elapsed * 1000:.0f} ms/step | mem {record['mem_gb']:.2f} GB")
            window_t0, window_steps = time.time(), 0
        if args.eval_interval and iteration % args.eval_interval == 0 and iteration < train_iters:
            evaluate(valid_ds, "val")
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            last_ckpt = save("interval") or last_ckpt
        if stop.agreed():
            log(f"received {stop.received or 'a stop signal on another rank'}: saving and exiting "
                f"(exit code {EXIT_PREEMPTED}; rerun to resume)")
            last_ckpt = save("preemption") or last_ckpt
            exit_code = EXIT_PREEMPTED
            if args.save and _rank0():  # tells slurm/common.sh to requeue the job
                with open(os.path.join(args.save, "requeue"), "w") as f:
                    f.write(str(iteration))
            break

    results = {}
    if exit_code == 0:
        results.update(evaluate(valid_ds, "val"))
        results.update(evaluate(test_ds, "test"))
        last_ckpt = save("end of training") or last_ckpt
        if args.sample_prompt:
            from pretrain.generate import generate

            text = generate(engine, tokenizer, args.sample_prompt, args.sample_tokens, cfg, seed=args.seed)
            log(f"sample: {args.sample_prompt!r} -> {text!r}")
    if exit_code == 0 and os.environ.get("PRETRAIN_DUMP_LOGITS"):
        _dump_logits(engine, valid_ds or train_ds, layout.micro_batch_size, os.environ["PRETRAIN_DUMP_LOGITS"])
    plot_path = None
    if args.plot and _rank0():
        from pretrain.plot import plot_losses

        plot_path = plot_losses(os.path.join(args.log_dir, "metrics.jsonl"), os.path.join(args.log_dir, "loss.png"))
    metrics.close()
    if exit_code == 0 and first_loss is not None:
        log(f"start loss: {first_loss:.4f}")
        log(f"end loss: {last_loss:.4f}")
        if "val_ppl" in results:
            log(f"validation perplexity: {results['val_ppl']:.2f}")
        log(f"checkpoint: {last_ckpt}")
        log(f"plot: {plot_path}")
    if dist.is_initialized():
        dist.barrier()
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
