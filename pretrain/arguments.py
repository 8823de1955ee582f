"""Command line of pretrain/main.py, in Megatron's spirit, plus a YAML/JSON run config (flags override it)."""
from __future__ import annotations

import argparse
import json
import os

from pretrain.config import PRESETS
from pretrain.objectives import OBJECTIVES

# Model fields that can be overridden flag by flag: --num-layers, --hidden-size, ...
MODEL_OVERRIDES = {
    "num_layers": int, "hidden_size": int, "num_attention_heads": int, "num_query_groups": int,
    "ffn_hidden_size": int, "rope_theta": float, "norm_eps": float, "init_std": float,
    "hidden_dropout": float, "attention_dropout": float, "make_vocab_size_divisible_by": int,
    # mixture of experts (pretrain/moe.py): --num-experts N turns each layer's MLP into N experts
    "num_experts": int, "moe_top_k": int, "moe_ffn_hidden_size": int, "moe_aux_loss_coeff": float,
    "moe_z_loss_coeff": float, "moe_shared_expert_size": int,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepspeed pretrain/main.py",
                                description="Pretrain a GPT/Llama model with megatron-core layers under DeepSpeed.")
    p.add_argument("--config", help="YAML or JSON file of options (keys as flag names); flags override it")
    p.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default="ds_configs/zero3.json", help="DeepSpeed JSON config (batch fields may be \"auto\")")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help=argparse.SUPPRESS)
    for add_group in (_model_args, _data_args, _schedule_args, _parallel_args, _run_args, _monitor_args):
        add_group(p)
    return p


def _model_args(p) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(PRESETS),
                   help="named preset (default: tiny; a resumed run without --model keeps its checkpoint's shape)")
    g.add_argument("--init-from-hf", metavar="DIR",
                   help="continue pretraining a Hugging Face Llama / Mistral / Qwen2 model: shape from DIR/"
                        "config.json, weights from its safetensors (each rank reads only its slice), tokenizer "
                        "from DIR; the optimizer starts fresh. Ignored once --save holds a checkpoint (resume)")
    g.add_argument("--init-from-checkpoint", metavar="DIR",
                   help="start a new run (fine-tuning, another objective) from the weights of one of our checkpoints, "
                        "saved under any layout: a save directory (its latest tag) or a tag directory. Shape from "
                        "its meta.json; the optimizer, schedule, iteration and data position start fresh (unlike "
                        "--load, which resumes). Ignored once --save holds a checkpoint (resume)")
    for name, typ in MODEL_OVERRIDES.items():
        g.add_argument("--" + name.replace("_", "-"), type=typ, help=f"override the preset's {name}")
    g.add_argument("--tie-embeddings", action="store_true", help="share input embedding and output layer")
    g.add_argument("--objective", choices=list(OBJECTIVES),
                   help="clm (default): a decoder trained on the next token; mlm: an encoder (bidirectional "
                        "attention) trained on masked tokens, exported as a Hugging Face EuroBERT (pretrain/mlm.py); "
                        "sft: fine-tuning on conversations (data_prep --format chat|instruction), answer-only loss, "
                        "whole conversations packed (pretrain/sft_data.py); start it with --init-from-checkpoint "
                        "or --init-from-hf")
    g.add_argument("--mask-prob", type=float, help="mlm: share of ordinary tokens chosen per sample (default 0.15)")
    g.add_argument("--mask-replace-prob", type=float,
                   help="mlm: share of the chosen tokens replaced by the mask token (default 0.8)")
    g.add_argument("--mask-random-prob", type=float,
                   help="mlm: share of the chosen tokens replaced by a random token (default 0.1; the rest of the "
                        "chosen stay unchanged)")
    g.add_argument("--tokenizer", help="tokenizer.json or its directory (default: the data manifest's)")


def _data_args(p) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="data_prep output dirs or shard prefixes, optionally weighted: "
                                                  "0.7 dirA 0.3 dirB")
    g.add_argument("--split", default="98,1,1", help="train,valid,test proportions of the documents")
    g.add_argument("--valid-data-path", nargs="+", help="separate validation data (instead of --split)")
    g.add_argument("--test-data-path", nargs="+", help="separate test data (instead of --split)")
    g.add_argument("--data-cache-dir", help="index cache directory (default: <data dir>/.index_cache)")
    g.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank")
    g.add_argument("--seq-length", type=int, help="tokens per sample (default: the preset's)")
    g.add_argument("--document-mask", action="store_true",
                   help="attend only within each document of a packed sample (EOD-separated) and restart positions "
                        "at every document start, as Llama 3 trained (FlexAttention on GPU)")


def _schedule_args(p) -> None:
    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, help="default: micro-batch-size x data-parallel size")
    g.add_argument("--train-iters", type=int, help="optimizer steps (0: evaluate and save the starting weights, e.g. "
                                                     "those --init-from-checkpoint or --init-from-hf gave)")
    g.add_argument("--train-tokens", type=int, help="alternative to --train-iters")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--min-lr", type=float, default=3e-5)
    g.add_argument("--warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant", "wsd"], default="cosine")
    g.add_argument("--lr-decay-iters", type=int, help="default: train iterations")
    g.add_argument("--wsd-decay-fraction", type=float, default=0.2, help="WSD: final fraction spent decaying")
    g.add_argument("--weight-decay", type=float, default=0.1, help="on matrices only (not norms or biases)")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--fp32", action="store_true", help="train in fp32 whatever the DeepSpeed config says (debugging,"
                                                       " exactness tests)")


def _parallel_args(p) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (needs ZeRO 0/1)")
    g.add_argument("--cp", type=int, default=1,
                   help="context-parallel size: each sample's sequence split across this many ranks (all-to-all "
                        "attention, document mask kept; gradients and ZeRO partitions span DP x CP; "
                        "pretrain/context_parallel.py). Must divide the attention heads per TP rank")
    g.add_argument("--ep", type=int, default=1,
                   help="expert-parallel size (a mixture of experts: --num-experts): each group of this many "
                        "data-parallel ranks splits the experts, tokens reach them by all-to-all; must divide DP "
                        "and the experts; ZeRO 1/2 (pretrain/moe.py)")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default="none",
                   help="activation checkpointing")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="megatron's sequence parallelism with --tp > 1: norms, dropout and residuals on 1/TP of the "
                        "sequence each (activation memory outside attention and the MLP divided by TP)")
    g.add_argument("--loss-chunks", default="1", metavar="K|auto",
                   help="compute the output layer and the loss over K pieces of the sequence, each chunk's logits "
                        "recomputed in the backward, so only one chunk's logits are alive (long context, large "
                        "vocabularies; same loss and gradients). auto: the fewest that keep the logits within one "
                        "layer's activations (pretrain.plan.auto_loss_chunks)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile every transformer layer (GPU speed; ZeRO 0-2; first steps are slower)")
    g.add_argument("--fused-swiglu", action="store_true",
                   help="megatron's fused SwiGLU kernel (torch.compile on GPU; eager on CPU: pretrain/__init__.py)")
    g.add_argument("--dist-timeout-minutes", type=float, default=10,
                   help="a collective waiting this long fails the run instead of hanging")


def _run_args(p) -> None:
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10, help="global batches per evaluation")
    g.add_argument("--eval-tasks", nargs="+", help="lm-eval-harness log-likelihood tasks (multiple choice, ...) "
                                                   "scored by the live model at every evaluation (clm)")
    g.add_argument("--eval-tasks-dir", help="directory of your lm-eval task YAML files (local data files: no "
                                            "download); without it, tasks come from lm-eval's registry")
    g.add_argument("--eval-tasks-limit", type=int, help="at most this many documents per task")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=1000)
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints to keep")
    g.add_argument("--async-save", action="store_true",
                   help="interval and keep-best saves copy each rank's state to host memory and write it in the "
                        "background while training goes on (pretrain/async_save.py); the end, a preemption and an "
                        "early stop wait for it and save synchronously")
    g.add_argument("--load", help="resume from here (default: --save, if it holds a checkpoint)")
    g.add_argument("--no-load-optim", action="store_true", help="load weights only")
    g.add_argument("--early-stop-patience", type=int, metavar="N",
                   help="stop (save, exit 0) after N evaluations in a row without --early-stop-metric beating its "
                        "best by more than --early-stop-min-delta; a resubmitted run that stopped exits at once "
                        "(pretrain/early_stop.py)")
    g.add_argument("--early-stop-min-delta", type=float, default=0.0, metavar="D",
                   help="the least change that counts as an improvement for --early-stop-patience")
    g.add_argument("--early-stop-metric", default="val_loss",
                   help="a validation scalar as logged: val_loss, val_ppl, val_accuracy, or val_<task>_<metric> "
                        "from --eval-tasks (e.g. val_arc_easy_acc_norm)")
    g.add_argument("--early-stop-mode", choices=["auto", "min", "max"], default="auto",
                   help="whether lower or higher is better (auto: from the name: *_loss, *_ppl lower; *_acc, "
                        "*_accuracy higher)")
    g.add_argument("--keep-best", action="store_true",
                   help="save every evaluation that sets a new best --early-stop-metric (even off "
                        "--save-interval); <save>/best names it, --keep-last never removes it, and export/convert "
                        "take --tag best")
    g.add_argument("--spike-sigma", type=float, metavar="K",
                   help="loss-spike guard (off by default; OLMo-core uses 6): after --spike-window applied steps, "
                        "skip a step whose loss exceeds the window's mean by K standard deviations, as a non-finite "
                        "step is skipped (pretrain/spike_guard.py)")
    g.add_argument("--spike-window", type=int, default=128, metavar="W", help="steps the spike guard averages over")
    g.add_argument("--max-skipped-steps", type=int, default=5,
                   help="stop after this many consecutive skipped steps (non-finite, or loss spikes)")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-dir", default="runs/latest", help="metrics.jsonl, loss curve")
    g.add_argument("--tensorboard-dir", help="default: <log-dir>/tensorboard")
    g.add_argument("--peak-tflops", type=float, help="device dense bf16 peak per GPU for MFU "
                                                     "(default: known for H100/H200/A100)")
    g.add_argument("--sample-prompt", help="print a generated sample for this prompt at the end")
    g.add_argument("--sample-tokens", type=int, default=64)
    g.add_argument("--plot", action="store_true", help="write <log-dir>/loss.png at the end")
    g.add_argument("--wandb-project", help="also log to Weights & Biases under this project (rank 0; needs "
                                           "`pip install wandb`; WANDB_MODE=offline on clusters without internet)")
    g.add_argument("--wandb-run-name", help="W&B run name (default: W&B's)")
    g.add_argument("--wandb-entity", help="W&B team or user (default: the logged-in user's)")


def _monitor_args(p) -> None:
    g = p.add_argument_group("stragglers and stalls (pretrain/monitor.py)")
    g.add_argument("--straggler-threshold", type=float, default=0.2,
                   help="every log interval, name a rank whose own work or data wait per step exceeds its pipeline "
                        "stage's median by more than this fraction")
    g.add_argument("--stall-factor", type=float, default=10.0,
                   help="a step running this many times the recent median step time is a stall: every thread's "
                        "stack goes to <log-dir>/stall-rank<R>-step<N>.txt (nothing is stopped)")
    g.add_argument("--stall-min-seconds", type=float, default=60.0,
                   help="a step shorter than this is never a stall (first steps: factor x this)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        file_values = _read_config(args.config)
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(file_values) - known)
        if unknown:
            parser.error(f"{args.config}: unknown option(s) {', '.join(unknown)}")
        parser.set_defaults(**file_values)
        args = parser.parse_args(argv)  # flags given on the command line still win
    if args.train_iters is None and args.train_tokens is None:
        parser.error("give --train-iters or --train-tokens")
    if args.init_from_checkpoint and (args.init_from_hf or args.load):
        other = "--init-from-hf" if args.init_from_hf else "--load"
        parser.error(f"--init-from-checkpoint and {other} both name the weights to start from: keep one "
                     f"(--load resumes a run: iteration, optimizer and data position; --init-from-checkpoint takes "
                     f"the weights alone)")
    if not args.data_path:
        parser.error("--data-path is required")
    return args


def _read_config(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    return {k.replace("-", "_"): v for k, v in values.items()}
