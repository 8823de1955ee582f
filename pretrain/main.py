"""Pretraining entry point: `deepspeed pretrain/main.py --deepspeed_config ds_configs/zero3.json [options]`.

setup -> fit -> finish, around one `Run` (what was built) and its `RunState` (what moves):
  setup   config -> parallel state -> DeepSpeed config -> engine -> data -> resume
  fit     the loop: one optimizer step, its log line, evaluation and checkpoints at their intervals, and the stop
          conditions (end, early stop on validation, preemption signal, too many non-finite steps)
  finish  final evaluation, checkpoint, sample, loss plot and summary

Exit codes: 0 done (also stopped early by --early-stop-patience: a rerun of such a run exits 0 at once); 2 bad
arguments, layout, data or checkpoint to resume from; 3 stopped by SIGTERM, SIGINT or SIGUSR1 after saving (requeue
me; pretrain/signals.py: a signal sent to every process of the job, as Slurm and Ctrl-C send it, still saves); 4
stopped after --max-skipped-steps consecutive skipped steps, non-finite or loss spikes (a checkpoint of the last
good state was saved); 5 a checkpoint could not be written (a full disk: the message names it; the partial
checkpoint was removed, the earlier ones are intact); 6 a collective failed or timed out after
--dist-timeout-minutes because another rank is dead or stuck (the message names it; rerun to resume).
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field

if __package__ in (None, ""):  # `deepspeed pretrain/main.py` runs this file as a script
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist

from data_prep import manifest, tokenizer as tokenizers
from launch import op_builds
from pretrain import checkpoint, downstream, early_stop, hf, sft_data, spike_guard  # first: pretrain/__init__.py
from pretrain.arguments import MODEL_OVERRIDES, parse_args
from pretrain.async_save import AsyncSaver
from pretrain.config import ModelConfig, preset
from pretrain.data import DataConfig, DataError, micro_batches, parse_data_path
from pretrain.engine import OptimConfig, build_engine, load_ds_config, zero3_partitioning, zero_stage_of
from pretrain.hooks import TestHooks, dump_logits
from pretrain.metrics import WANDB_PIN, MetricsWriter, StepLog, device_peak_tflops, new_wandb_id
from pretrain.model import ModelOptions
from pretrain.monitor import CollectiveTracker, StragglerMonitor, TimedIterator, Watchdog, straggler_lines
from pretrain.objectives import objective
from pretrain.parallel import (Layout, LayoutError, heartbeat, init_distributed, is_peer_failure, is_rank0, log,
                               peers_report, shutdown_distributed, validate_layout)
from pretrain.schedule import lr_at
from pretrain.signals import StopSignal
from pretrain.step import SkipCounter, StepResult, release_gathered, train_step
from pretrain.step import evaluate as evaluate_batches
from megatron.core import parallel_state  # noqa: E402  (after pretrain: its __init__ runs first)

EXIT_PREEMPTED = 3
EXIT_TOO_MANY_SKIPS = 4
EXIT_SAVE_FAILED = 5
EXIT_PEER_LOST = 6


@dataclass
class RunState:
    """What changes as training goes: the position, the losses of the summary, the last checkpoint."""

    iteration: int = 0
    consumed_samples: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    last_checkpoint: str | None = None
    saved_iteration: int | None = None
    stopped_early: str | None = None  # "here" (this run's evaluation) or "before" (the resumed checkpoint's)


@dataclass
class Run:
    """Everything setup built, read by fit and finish."""

    args: object
    cfg: ModelConfig
    layout: Layout
    engine: object
    tokenizer: object
    datasets: tuple
    train_iters: int
    decay_iters: int
    train_iter: object
    metrics: MetricsWriter
    step_log: StepLog
    skips: SkipCounter
    stop: StopSignal
    hooks: TestHooks
    run_config: dict
    stragglers: StragglerMonitor
    watchdog: Watchdog
    state: RunState = field(default_factory=RunState)
    task_lm: object = None  # --eval-tasks: pretrain.downstream's lm-eval model, built on first use
    early: early_stop.EarlyStopping | None = None  # --early-stop-patience / --keep-best
    saver: AsyncSaver | None = None  # --async-save
    spike: spike_guard.SpikeGuard | None = None  # --spike-sigma


# ------------------------------------------------------------------------------------------------ setup
# Model fields a flag may still set on an imported or resumed shape: they change no parameter.
NOT_SHAPE = ("hidden_dropout", "attention_dropout", "init_std")


def model_config(args, vocab_size: int) -> ModelConfig:
    """The model's shape: --init-from-hf's config.json; else, resuming without --model, the checkpoint's; else the
    --model preset with flag overrides. A shape flag that contradicts an imported or resumed shape is an error
    naming both (never a silently different model)."""
    overrides = {k: getattr(args, k) for k in MODEL_OVERRIDES if getattr(args, k) is not None}
    init = init_checkpoint(args)
    source = init or resume_source(args)
    saved = None if args.init_from_hf or args.model else checkpoint.saved_model_config(source)
    if not args.init_from_hf and not saved:
        return preset(args.model or "tiny", vocab_size=vocab_size, tie_embeddings=args.tie_embeddings or None,
                      seq_length=args.seq_length, objective=args.objective, **overrides)
    if args.init_from_hf:
        cfg, origin = hf.model_config(args.init_from_hf, args.seq_length), f"--init-from-hf {args.init_from_hf}"
        if args.model:
            raise LayoutError(f"--model {args.model} contradicts --init-from-hf {args.init_from_hf}, which gives "
                              f"the shape (config.json); drop --model")
    else:
        cfg, origin = ModelConfig(**saved), f"the checkpoint in {source} (meta.json: model_config)"
        cfg.seq_length = args.seq_length or cfg.seq_length
    for key, value in overrides.items():
        if key in NOT_SHAPE:
            setattr(cfg, key, value)
        elif getattr(cfg, key) != value:
            raise LayoutError(f"--{key.replace('_', '-')} {value} contradicts {origin}, where {key} = "
                              f"{getattr(cfg, key)}; drop the flag (the shape comes from there)")
    if args.tie_embeddings and not cfg.tie_embeddings:
        raise LayoutError(f"--tie-embeddings contradicts {origin}, whose embeddings are untied; drop the flag")
    if args.objective and args.objective != cfg.objective:
        if not (args.init_from_hf or init):  # a resumed run keeps its objective; a new run from
            # weights may take another (the same layers: attention and loss are the objective's)
            raise LayoutError(f"--objective {args.objective} contradicts {origin}, trained as {cfg.objective}; "
                              f"drop the flag, or start a new run (--save elsewhere) from an export")
        if cfg.objective not in objective(args.objective).from_objectives:
            raise LayoutError(f"--objective {args.objective} cannot start from {origin}, trained as "
                              f"{cfg.objective}: its attention is bidirectional, the fine-tune's causal; start "
                              f"from a clm model's checkpoint or export")
        cfg.objective = args.objective
    if vocab_size > cfg.vocab_size:
        raise LayoutError(f"the tokenizer has {vocab_size} tokens but {origin} embeds {cfg.vocab_size}; use the "
                          f"tokenizer the model was trained with")
    return cfg


def check_context_parallel_options(args) -> None:
    """--cp splits every forward's sequence into equal chunks: sampling's prompts grow a token at a time and do not
    split, so it runs without it. (--eval-tasks pads every request to the sequence length: it runs.)"""
    if args.cp > 1 and args.sample_prompt:
        raise LayoutError(f"--sample-prompt cannot run with --cp {args.cp}: context parallelism splits each sequence "
                          f"into {args.cp} equal chunks and a prompt has its own length; drop --sample-prompt "
                          f"(sample from the export: python -m pretrain.export, then transformers) or --cp")


def loss_chunks(value: str, cfg: ModelConfig, layout: Layout, recompute: str, sequence_parallel: bool) -> int:
    """--loss-chunks K|auto -> K (pretrain.plan.resolve_loss_chunks, as the planner resolves it)."""
    from pretrain.plan import resolve_loss_chunks

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    chunks = resolve_loss_chunks(value, cfg, layout, recompute, sequence_parallel, device_type)
    if value == "auto":
        log(f"--loss-chunks auto: {chunks} (the loss's logits within one layer's activations)")
    return chunks


def tokenizer_path(args) -> str:
    """--tokenizer, else --init-from-hf's, else the data manifest's; it must be the one the data was made with."""
    paths = [path for _, path in parse_data_path(args.data_path)]
    if args.tokenizer or args.init_from_hf:
        path = tokenizers.resolve(args.tokenizer or args.init_from_hf)
        manifest.check_tokenizer(paths, path)
        return path
    return manifest.tokenizer_path(paths)


def setup(args) -> Run:
    check_optional_packages(args)
    early_stop.check_options(args)
    op_builds.check()  # DeepSpeed loads its JIT-built ops in init_distributed; a killed build's lock hangs it
    tracker = CollectiveTracker().install()  # before any collective: stragglers and the watchdog read it
    tok_path = tokenizer_path(args)
    tokenizer = tokenizers.load(tok_path)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    cfg = model_config(args, vocab)
    transform = data_transform(args, cfg, tokenizer, tok_path, vocab)
    world = int(os.environ.get("WORLD_SIZE", 1))
    layout = validate_layout(cfg, world, args.tp, args.pp, zero_stage_of(args.deepspeed_config),
                             args.micro_batch_size, args.global_batch_size, args.recompute, args.compile,
                             args.sequence_parallel, args.cp, args.ep)
    check_context_parallel_options(args)
    chunks = loss_chunks(args.loss_chunks, cfg, layout, args.recompute, args.sequence_parallel)
    stop, hooks = StopSignal(), TestHooks()
    init_distributed(args.tp, args.pp, args.seed, args.dist_timeout_minutes, args.cp, args.ep)
    hooks.announce()
    ds_config = load_ds_config(args.deepspeed_config, layout, args.clip_grad, args.fp32, cfg.hidden_size,
                               args.sequence_parallel)
    resume_from, init = checkpoint.find_resume(resume_source(args)), init_checkpoint(args)
    opt = OptimConfig(lr=args.lr, weight_decay=args.weight_decay, beta1=args.adam_beta1, beta2=args.adam_beta2,
                      eps=args.adam_eps, clip_grad=args.clip_grad)
    eod = tokenizers.eod_id(tokenizer, tok_path)
    options = ModelOptions(recompute=args.recompute, sequence_parallel=args.sequence_parallel,
                           document_eod=eod if args.document_mask else None,
                           loss_chunks=chunks)
    engine = build_engine(cfg, layout, ds_config, opt, options, args.seed, args.compile, args.fused_swiglu)
    hooks.install(engine)

    gbs, seq = layout.global_batch_size, cfg.seq_length
    train_iters = args.train_iters if args.train_iters is not None else math.ceil(args.train_tokens / (gbs * seq))
    datasets = _datasets(args, cfg, layout, train_iters, vocab, eod)
    template = sft_data.chat_template(args.data_path)  # fine-tuning data's: for --sample-prompt and the export
    if transform:
        datasets = transform(datasets)
    state = RunState()
    run_config = {**vars(args), "model_config": cfg.__dict__, "world_size": world, "dp": layout.dp,
                  "tokenizer_path": os.path.abspath(tok_path), "test_hooks": hooks.active,
                  **({"chat_template": template} if template else {})}
    if resume_from:
        for flag in ("init_from_hf", "init_from_checkpoint"):
            if getattr(args, flag):
                log(f"--{flag.replace('_', '-')} {getattr(args, flag)} is not read: resuming from {resume_from}")
        loaded = checkpoint.load(engine, resume_from, layout, cfg.parameter_shapes(), not args.no_load_optim)
        state.iteration, state.consumed_samples = loaded["iteration"], loaded["consumed_samples"]
        run_config["resumed_from"] = {"checkpoint": os.path.abspath(resume_from), "layout": loaded["layout"],
                                      "converted": not loaded["same_layout"]}
        change = "" if loaded["same_layout"] else (f" (saved under {_layout_text(loaded['layout'])}, resharded to "
                                                   f"{_layout_text(checkpoint.layout_meta(layout))})")
        log(f"resumed from {resume_from} at iteration {state.iteration} ({state.consumed_samples} samples "
            f"consumed){change}")
    elif args.init_from_hf:
        import_hf_weights(engine, cfg, layout, args.init_from_hf)
        run_config["init_from_hf"] = os.path.abspath(args.init_from_hf)
    elif init:
        run_config["init_from_checkpoint"] = init_weights(engine, cfg, layout, init)
    train_iter = TimedIterator(micro_batches(datasets[0], state.consumed_samples, layout.micro_batch_size,
                                             parallel_state.get_data_parallel_rank(), layout.dp, args.num_workers))
    peak = args.peak_tflops or device_peak_tflops()[0]
    wandb = wandb_options(args, run_config, loaded["run_config"] if resume_from else {})
    saved_state = (loaded.get("trainer_state") or {}) if resume_from else {}
    spike = None
    if args.spike_sigma:
        spike = spike_guard.SpikeGuard(args.spike_sigma, args.spike_window, saved_state.get("spike_window"))
        spike.install(engine, layout.grad_accum_steps)
    return Run(args=args, cfg=cfg, layout=layout, engine=engine, tokenizer=tokenizer, datasets=datasets,
               train_iters=train_iters, decay_iters=args.lr_decay_iters or max(train_iters, 1), train_iter=train_iter,
               metrics=MetricsWriter(args.log_dir, args.tensorboard_dir, enabled=is_rank0(), wandb=wandb,
                                   resumed_at=state.iteration),
               step_log=StepLog(gbs * seq, cfg.flops_per_token(seq), world, peak),
               skips=SkipCounter(args.max_skipped_steps), stop=stop, hooks=hooks, run_config=run_config,
               **monitors(args, tracker, train_iter), state=state,
               early=early_stop.EarlyStopping.from_args(args, saved_state.get("early_stop")), spike=spike,
               saver=AsyncSaver() if args.async_save and args.save else None)


def monitors(args, tracker: CollectiveTracker, train_iter: TimedIterator) -> dict:
    """The straggler report and the stall watchdog (pretrain/monitor.py), reading the collectives' tracker."""
    return {"stragglers": StragglerMonitor(tracker, train_iter, args.straggler_threshold,
                                           parallel_state.get_pipeline_model_parallel_rank()),
            "watchdog": Watchdog(args.log_dir, dist.get_rank() if dist.is_initialized() else 0, tracker,
                                 args.stall_factor, args.stall_min_seconds).start()}


def check_optional_packages(args) -> None:
    """On every rank before anything is built: a package a flag needs and that is missing stops all ranks alike
    (not a hang while rank 0 fails alone)."""
    import importlib.util

    needs = [(args.wandb_project, f"--wandb-project {args.wandb_project}", "wandb", WANDB_PIN,
              " (or drop --wandb-project: metrics.jsonl and TensorBoard are always written)"),
             (args.eval_tasks, "--eval-tasks", "lm_eval", downstream.LM_EVAL_PIN, "")]
    for asked, flag, module, pin, hint in needs:
        if asked and importlib.util.find_spec(module) is None:
            raise LayoutError(f"{flag}: the {module} package is not installed; `pip install {pin}`{hint}")


def wandb_options(args, run_config: dict, saved_run_config: dict) -> dict | None:
    """wandb.init's arguments, or None. The run id continues the checkpoint's W&B run; a new run draws one, and
    run_config (saved with every checkpoint) keeps it."""
    if not args.wandb_project:
        return None
    run_config["wandb_run_id"] = saved_run_config.get("wandb_run_id") or new_wandb_id()
    return {"project": args.wandb_project, "name": args.wandb_run_name, "entity": args.wandb_entity,
            "id": run_config["wandb_run_id"], "config": run_config}


def data_transform(args, cfg: ModelConfig, tokenizer, tok_path: str, vocab: int):
    """The objective's dataset wrapper (pretrain/objectives.py; mlm: masking), after refusing the options it does
    not honour, naming them."""
    try:
        obj = objective(cfg.objective)
        obj.check_options(args)
        return obj.data_transform(args, tokenizer, tok_path, vocab)
    except ValueError as e:
        raise LayoutError(str(e)) from None


def import_hf_weights(engine, cfg: ModelConfig, layout: Layout, hf_dir: str) -> None:
    """Every rank reads its own slots' elements from the safetensors (pretrain/hf.py); the optimizer is fresh."""
    t0 = time.time()
    checkpoint.load_states(engine, hf.HFReader(hf_dir, cfg), layout, cfg.parameter_shapes(), load_optimizer=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log(f"initialised from {hf_dir} ({cfg.family}, {cfg.num_params() / 1e6:.2f}M parameters) in "
        f"{time.time() - t0:.1f} s; the optimizer starts fresh; peak RSS {peak:.0f} MiB per rank")


def init_weights(engine, cfg: ModelConfig, layout: Layout, source: str) -> str:
    """--init-from-checkpoint: the weights of `source` (verified; any layout, resharded as a resume is) as fp32
    masters and model weights; Adam, the schedule, the iteration and the data position start fresh. Read only:
    another run's directory is never changed (a damaged tag is an error naming it, not set aside as a resume
    does with its own)."""
    try:
        tag_dir = checkpoint.resolve_tag(source)
    except FileNotFoundError as e:
        raise checkpoint.CheckpointError(f"--init-from-checkpoint {source}: {e}; name a save directory that holds "
                                         f"one, or a tag directory (iter_NNNNNNN)") from None
    meta = checkpoint.read_meta(tag_dir)
    checkpoint.load_states(engine, checkpoint.CheckpointReader(tag_dir, meta), layout, cfg.parameter_shapes(),
                           load_optimizer=False)
    log(f"initialised from {tag_dir} (iteration {meta['iteration']} of a "
        f"{meta['model_config'].get('objective', 'clm')} run "
        f"under {_layout_text(meta['layout'])}); the optimizer, schedule and data start fresh at iteration 0")
    return os.path.abspath(tag_dir)


def init_checkpoint(args) -> str | None:
    """--init-from-checkpoint, while this run has no checkpoint of its own (then it resumes that instead)."""
    if args.init_from_checkpoint and not (args.save and checkpoint.complete_tags(args.save)):
        return args.init_from_checkpoint
    return None


def resume_source(args) -> str | None:
    """--save when it already holds a checkpoint (a restarted or requeued run continues its own work), else
    --load (the checkpoint a new run starts from)."""
    if args.save and checkpoint.complete_tags(args.save):
        return args.save
    return args.load or args.save


def _layout_text(layout: dict) -> str:
    zero = "" if layout.get("zero_stage") is None else f" ZeRO-{layout['zero_stage']}"
    cp = f" CP={layout['cp']}" if layout.get("cp", 1) > 1 else ""
    ep = f" EP={layout['ep']}" if layout.get("ep", 1) > 1 else ""
    return f"TP={layout['tp']} PP={layout['pp']}{cp}{ep} DP={layout.get('dp')}{zero}"


def _datasets(args, cfg: ModelConfig, layout: Layout, train_iters: int, vocab: int, eod: int):
    """-> (train, valid, test) with enough samples for the whole run, every evaluation and the final test."""
    gbs = layout.global_batch_size
    n_evals = train_iters // args.eval_interval + 1 if args.eval_interval else 1
    data_cfg = DataConfig(data_path=args.data_path, split=args.split, seq_length=cfg.seq_length, seed=args.seed,
                          cache_dir=args.data_cache_dir, num_workers=args.num_workers, vocab_size=vocab,
                          eod_id=eod, valid_data_path=args.valid_data_path, test_data_path=args.test_data_path)
    obj = objective(cfg.objective)
    try:
        obj.check_data(sft_data.data_formats(args.data_path))
    except ValueError as e:
        raise DataError(str(e)) from None
    datasets = obj.datasets(data_cfg, (max(train_iters, 1) * gbs, n_evals * args.eval_iters * gbs,
                                       args.eval_iters * gbs), eod)
    for name, dataset in zip(("train", "valid", "test"), datasets):
        if hasattr(dataset, "describe"):
            log(f"{name}: {dataset.describe()}")
    return datasets


# ------------------------------------------------------------------------------------------------ fit
def fit(run: Run) -> int:
    """Train until --train-iters; -> exit code."""
    args, state = run.args, run.state
    cfg = run.cfg
    cp = f"CP={run.layout.cp} " if run.layout.cp > 1 else ""
    log(f"model: {cfg.num_params() / 1e6:.2f}M parameters ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_attention_heads} heads); layout TP={run.layout.tp} PP={run.layout.pp} {cp}"
        + (f"EP={run.layout.ep} " if run.layout.ep > 1 else "") +
        f"DP={run.layout.dp} ZeRO-{run.layout.zero_stage}; global batch "
        f"{run.layout.global_batch_size} x {run.cfg.seq_length} tokens, {run.layout.grad_accum_steps} "
        f"micro-batch(es) of {run.layout.micro_batch_size} per rank; {run.train_iters} iterations")
    if cfg.is_moe:
        log(f"mixture of experts: {cfg.num_experts} experts per layer, top-{cfg.moe_top_k}, "
            f"{cfg.active_params() / 1e6:.2f}M of the {cfg.num_params() / 1e6:.2f}M parameters active per token "
            f"(MFU counts these); EP={run.layout.ep}: {cfg.num_experts // run.layout.ep} experts per rank; dropless "
            f"(no capacity factor: no token is dropped); aux loss x{cfg.moe_aux_loss_coeff}"
            + (f", z-loss x{cfg.moe_z_loss_coeff}" if cfg.moe_z_loss_coeff else ""))
    part = zero3_partitioning(run.engine)
    if part:
        log(f"ZeRO-3: {part['partitioned']} of {part['zero3_params']} parameter tensors "
            f"({part['partitioned_elements'] / max(part['all_elements'], 1):.1%} of the elements) partitioned over "
            f"DP={run.layout.dp}" + (f" x CP={run.layout.cp}" if run.layout.cp > 1 else "")
            + "; the rest (under stage3_param_persistence_threshold) stay whole on every rank")
    if getattr(run.engine, "zero3_decision", None):
        log(run.engine.zero3_decision.describe())
    if run.early and run.early.should_stop():
        log(f"this run stopped early at iteration {state.iteration}: {run.early.why()}; nothing to train (raise "
            f"--early-stop-patience or drop it to train on)")
        state.stopped_early = "before"
        return 0
    while state.iteration < run.train_iters:
        train_one_step(run)
        if run.saver:  # a background save that ended: committed (or its failure, raised on every rank)
            state.last_checkpoint = run.saver.poll() or state.last_checkpoint
        if run.skips.exhausted:
            first_bad = state.consumed_samples - run.skips.in_a_row * run.layout.global_batch_size
            log(f"error: {run.skips.in_a_row} consecutive skipped steps, non-finite or loss spikes "
                f"(--max-skipped-steps {args.max_skipped_steps}); saving the last good state and stopping. Lower "
                f"--lr, check the data around sample {first_bad}, or raise --clip-grad (or --spike-sigma).")
            save(run, "stopped after skipped steps")
            return EXIT_TOO_MANY_SKIPS
        if args.eval_interval and state.iteration % args.eval_interval == 0 and state.iteration < run.train_iters:
            values = {**evaluate(run, run.datasets[1], "val"), **evaluate_tasks(run)}
            release_gathered(run.engine)  # ZeRO-3: what those forwards gathered, before training goes on
            if run.early and watch(run, values):
                return 0
        if args.save and args.save_interval and state.iteration % args.save_interval == 0:
            save(run, "interval", background=True)
        stop = run.stop.agreed()
        if stop:
            # The step a signal arrives in is finished, not abandoned: from the first backward on, ZeRO has
            # reduce-scattered part of its gradients across ranks, and a checkpoint holds whole steps only; the
            # time left (launcher and Slurm graces: README "Preemption and signals") pays for one step plus the save.
            log(f"received {run.stop.received or 'a stop signal on another rank'}: step {state.iteration} finished, "
                f"saving and exiting (exit code {EXIT_PREEMPTED}; " +
                ("the Slurm scripts requeue the job)" if stop == "warning" else "rerun to resume)"))
            save(run, "preemption")
            if stop == "warning" and args.save and is_rank0():  # USR1: tells slurm/common.sh to requeue the job
                with open(os.path.join(args.save, "requeue"), "w") as f:
                    f.write(str(state.iteration))
            return EXIT_PREEMPTED
    return 0


def train_one_step(run: Run) -> StepResult:
    """Set the learning rate, run one global batch, advance the position, count a skip, log."""
    args, state = run.args, run.state
    lr = lr_at(state.iteration, args.lr, args.min_lr, args.warmup_iters, run.decay_iters, args.lr_decay_style,
               args.wsd_decay_fraction)
    for group in run.engine.optimizer.param_groups:
        group["lr"] = lr
    t0 = time.time()
    run.hooks.step = state.iteration + 1
    run.watchdog.step_started(state.iteration + 1)
    if run.spike:
        run.spike.begin(state.iteration + 1)
    result = train_step(run.engine, run.train_iter, objective(run.cfg.objective).global_loss_tokens)
    spiked = run.spike.agree() if run.spike else False
    run.watchdog.step_finished()
    step_time = time.time() - t0
    run.stragglers.step_done(step_time)
    state.iteration += 1
    state.consumed_samples += run.layout.global_batch_size
    heartbeat(state.iteration)
    run.step_log.step_done()
    run.skips.update(result)
    if result.skipped:
        gbs = run.layout.global_batch_size
        why = (f"loss spike {result.loss:.4f} above {run.spike.threshold():.4f} (the mean of the last "
               f"{run.spike.size} applied steps + {run.spike.sigma:g} sd)" if spiked else
               "non-finite loss or grad norm")
        log(f"iteration {state.iteration:6d} | {why}: step skipped ({run.skips.in_a_row} in a row, "
            f"{run.skips.total} total); its samples: [{state.consumed_samples - gbs}, {state.consumed_samples}) of "
            f"the training order")
        run.metrics.write({"step": state.iteration, "consumed_samples": state.consumed_samples, "skipped": True,
                           "skipped_total": run.skips.total, "loss": None,
                           **({"spike_loss": result.loss} if spiked else {})})
    else:
        if run.spike:
            run.spike.applied(result.loss)
        state.first_loss = result.loss if state.first_loss is None else state.first_loss
        state.last_loss = result.loss
    if state.iteration % args.log_interval == 0 or state.iteration == 1 or state.iteration == run.train_iters:
        record = run.step_log.record(state.iteration, state.consumed_samples, run.cfg.seq_length, result, lr,
                                     step_time, run.skips.total)
        ranks = run.stragglers.report()  # every rank, at the same step
        record.update(ranks=ranks["ranks"], stragglers=ranks["stragglers"])
        run.metrics.write(record)
        log(StepLog.line(record, run.train_iters))
        for line in straggler_lines(ranks):
            log(line)
    return result


def evaluate(run: Run, dataset, name: str) -> dict:
    """Mean loss over --eval-iters global batches of `dataset`, logged as <name>_loss / <name>_ppl, and the top-1
    accuracy over the tokens the loss counts as <name>_accuracy (masked tokens for mlm, next tokens for clm)."""
    if dataset is None:
        return {}
    layout = run.layout
    it = micro_batches(dataset, 0, layout.micro_batch_size, parallel_state.get_data_parallel_rank(), layout.dp,
                       num_workers=0, cycle=True)
    result = evaluate_batches(run.engine, it, run.args.eval_iters * layout.grad_accum_steps,
                              objective(run.cfg.objective).global_loss_tokens)
    loss = result["loss"]
    out = {f"{name}_loss": loss, f"{name}_ppl": math.exp(min(loss, 50)), f"{name}_accuracy": result["accuracy"]}
    run.metrics.write({"step": run.state.iteration, "consumed_samples": run.state.consumed_samples, **out})
    what = objective(run.cfg.objective).loss_tokens
    log(f"iteration {run.state.iteration:6d} | {name} loss {loss:.4f} | {name} ppl {out[f'{name}_ppl']:.2f} | "
        f"{name} {what} accuracy {result['accuracy']:.4f}")
    return out


def evaluate_tasks(run: Run) -> dict:
    """--eval-tasks on the live model (pretrain/downstream.py), logged as val_<task>_<metric>; every request's
    log-likelihood goes to <log-dir>/downstream/step-NNNNNNN.jsonl."""
    args = run.args
    if not args.eval_tasks:
        return {}
    if run.task_lm is None:
        run.task_lm = downstream.engine_lm(run.engine, os.path.dirname(run.run_config["tokenizer_path"]),
                                           run.cfg.seq_length, run.layout.micro_batch_size)
    t0 = time.time()
    values, scored = downstream.evaluate_tasks(run.task_lm, args.eval_tasks, args.eval_tasks_dir,
                                               args.eval_tasks_limit)
    out = {f"val_{k}": v for k, v in values.items()}
    run.metrics.write({"step": run.state.iteration, "consumed_samples": run.state.consumed_samples, **out})
    if is_rank0():
        downstream.write_scored(args.log_dir, run.state.iteration, scored)
    log(f"iteration {run.state.iteration:6d} | tasks ({time.time() - t0:.1f} s, {len(scored)} requests) | " +
        " | ".join(f"{k} {v:.4f}" for k, v in sorted(values.items())))
    return out


def watch(run: Run, values: dict) -> bool:
    """Early stopping and --keep-best after an evaluation (pretrain/early_stop.py); -> True when the run stops."""
    verdict = run.early.update(values, run.state.iteration)
    if verdict.improved and run.args.keep_best:
        save(run, f"new best {run.early.metric} {verdict.value:.6g}", best=True, background=True)
    if not verdict.stop:
        return False
    log(f"early stop at iteration {run.state.iteration}: {run.early.why()}")
    save(run, "early stop")
    run.state.stopped_early = "here"
    return True


def save(run: Run, reason: str, best: bool = False, background: bool = False) -> str | None:
    """A checkpoint of the current state (at most one per iteration); -> its path, or None. best: <save>/best
    names it (--keep-best), also when this iteration was already saved. background: written behind the loop with
    --async-save (interval and new-best saves); any other save first waits for the one in flight."""
    state = run.state
    if not run.args.save:
        return None
    background = background and run.saver is not None
    if run.saver and not background:  # the end, a preemption, an early stop: the save in flight first
        state.last_checkpoint = run.saver.wait(reason) or state.last_checkpoint
    if state.saved_iteration == state.iteration:
        if best:
            if run.saver:  # `best` names only a committed tag
                state.last_checkpoint = run.saver.wait("best names it") or state.last_checkpoint
            checkpoint.mark_best(run.args.save, checkpoint.tag_name(state.iteration))
        return None
    state.saved_iteration = state.iteration
    trainer_state = {"early_stop": run.early.state_dict()} if run.early else {}
    if run.spike:
        trainer_state["spike_window"] = run.spike.state()
    saving = (run.saver.save if background else checkpoint.save)
    t0 = time.time()
    path = saving(run.engine, run.args.save, state.iteration, state.consumed_samples, run.layout, run.cfg.__dict__,
                  run.run_config, run.args.keep_last, trainer_state, best)
    # how long the loop was held (a background save: its copy to host memory, and any wait for the one before)
    run.metrics.write({"step": state.iteration, "consumed_samples": state.consumed_samples,
                       "save_blocked_s": time.time() - t0, "save_background": background})
    if not background:
        log(f"saved checkpoint {path} ({reason}{'; best names it' if best else ''})")
        state.last_checkpoint = path
    return path



# ------------------------------------------------------------------------------------------------ finish
def finish(run: Run, exit_code: int) -> None:
    args, state = run.args, run.state
    results, best = {}, False
    if exit_code == 0 and state.stopped_early != "before":
        if not state.stopped_early:  # (an early stop evaluated this very step)
            results.update(evaluate(run, run.datasets[1], "val"))
            results.update(evaluate_tasks(run))
            if run.early:
                best = run.early.update(results, state.iteration).improved and args.keep_best
        results.update(evaluate(run, run.datasets[2], "test"))
        save(run, "end of training", best=best)
        if args.sample_prompt:
            from pretrain.generate import generate

            text = generate(run.engine, run.tokenizer, args.sample_prompt, args.sample_tokens, run.cfg,
                            seed=args.seed, chat_template=run.run_config.get("chat_template"))
            log(f"sample: {args.sample_prompt!r} -> {text!r}")
        if run.hooks.dump_logits_path:
            dump_logits(run.engine, run.datasets[1] or run.datasets[0], run.layout.micro_batch_size,
                        run.hooks.dump_logits_path)
    plot_path = None
    if args.plot and is_rank0():
        from pretrain.plot import plot_losses

        plot_path = plot_losses(os.path.join(args.log_dir, "metrics.jsonl"), os.path.join(args.log_dir, "loss.png"))
    run.watchdog.stop()
    run.metrics.close(exit_code, preempted=exit_code == EXIT_PREEMPTED)
    if exit_code == 0 and state.first_loss is not None:
        log(f"start loss: {state.first_loss:.4f}")
        log(f"end loss: {state.last_loss:.4f}")
        if "val_ppl" in results:
            log(f"validation perplexity: {results['val_ppl']:.2f}")
        log(f"checkpoint: {state.last_checkpoint}")
        log(f"plot: {plot_path}")
    if dist.is_initialized():
        dist.barrier()  # every rank got here: the orderly end at which the groups may go
    shutdown_distributed()


def main(argv=None) -> int:
    args = parse_args(argv)
    run = None
    try:
        run = setup(args)
        exit_code = fit(run)
        finish(run, exit_code)
    except checkpoint.SaveError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_SAVE_FAILED
    except (LayoutError, DataError, manifest.ManifestError, FileNotFoundError, checkpoint.CheckpointError,
            op_builds.StaleLockError, early_stop.EarlyStopError, spike_guard.SpikeGuardError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("error: stopped by a second Ctrl-C without saving; rerun to resume from the last checkpoint",
              file=sys.stderr, flush=True)
        return 130
    except RuntimeError as e:
        if not is_peer_failure(e) or not dist.is_initialized():
            raise
        step = run.state.iteration + 1 if run else 0
        print(f"error: rank {dist.get_rank()}: a collective failed in step {step} ({str(e).splitlines()[0][:300]});"
              f" {peers_report(step)}. Rerun the same command to resume from the last checkpoint.",
              file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    return exit_code


EXIT_MEANINGS = {2: "bad arguments or input", EXIT_PREEMPTED: "preempted: checkpoint saved, rerun to resume",
                 EXIT_TOO_MANY_SKIPS: "too many non-finite steps", EXIT_SAVE_FAILED: "a checkpoint could not be "
                 "written", EXIT_PEER_LOST: "another rank is dead or stuck", 130: "second Ctrl-C, not saved"}


def exit_with(code: int) -> None:
    """Each rank says how it ends: a launcher that was signalled reports its own code, not the ranks' (DeepSpeed's
    launch.py exits 1, its runner dies of the signal; README "Preemption and signals")."""
    if code:
        rank = os.environ.get("RANK", "0")
        print(f"rank {rank}: exit code {code} ({EXIT_MEANINGS.get(code, 'error')})", file=sys.stderr, flush=True)
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
