"""Downstream evaluation while training (--eval-tasks): lm-eval-harness tasks scored by the live model, at every
--eval-interval and at the end, under any layout.

lm-eval drives the evaluation on every rank identically (each rank is its rank 0 of 1: same requests, same order),
so every forward pass is one the whole model takes together: TP ranks, ZeRO-3's parameter gathers and pipeline
stages all need every rank. Requests are packed into micro-batches of the training shape ([micro-batch,
seq-length], right-padded; a causal model's earlier positions do not see the padding), scored on the vocab-parallel
logits without gathering the vocabulary (log-likelihood through megatron's vocab-parallel cross-entropy, greedy
through pretrain.model.top1_correct), and, under pipeline parallelism, broadcast from the last stage.

Tokenization is lm-eval's own (TemplateLM: context/continuation split, empty-context prefix token) over the run's
tokenizer loaded by transformers, so the same task scored by lm-eval's `hf` model on the exported checkpoint sees
the same tokens (the test compares per-request log-likelihoods). Only log-likelihood tasks (multiple choice,
loglikelihood): generation and rolling perplexity are for the export (`lm_eval --model hf`).

Tasks come from the user's YAML files (--eval-tasks-dir, lm-eval's include_path: local data files, no download) or
lm-eval's registry. The global RNG states are restored afterwards, so evaluating does not change training.
"""
from __future__ import annotations

import json
import os

import torch

from pretrain.compat import device

LM_EVAL_PIN = "lm-eval==0.4.13"  # the version the tests ran (requirements.txt)


def engine_lm(engine, tokenizer_dir: str, seq_length: int, micro_batch_size: int):
    """An lm_eval TemplateLM over the engine (built here: lm_eval is imported only when asked for)."""
    from lm_eval.api.model import TemplateLM
    from transformers import AutoTokenizer

    class EngineLM(TemplateLM):
        def __init__(self):
            super().__init__()
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            self.scored: list[dict] = []  # every request's tokens and result, for the record

        @property
        def eot_token_id(self) -> int:
            return self.tokenizer.eos_token_id

        @property
        def prefix_token_id(self) -> int:  # as lm-eval's hf model: BOS if the tokenizer has one, else EOS
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.tokenizer.eos_token_id

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
            return self.tokenizer.encode(string, **kw)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            out = []
            for i in range(0, len(requests), micro_batch_size):
                chunk = requests[i:i + micro_batch_size]
                out += score(engine, [(ctx, cont) for _, ctx, cont in chunk], seq_length, micro_batch_size,
                             self.eot_token_id)
            self.scored += [{"request": list(r[0]), "logprob": lp, "greedy": g} for r, (lp, g) in zip(requests, out)]
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("--eval-tasks runs log-likelihood tasks only; evaluate rolling perplexity on "
                                      "the export: lm_eval --model hf --model_args pretrained=<export dir>")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("--eval-tasks runs log-likelihood tasks only; evaluate generation tasks on "
                                      "the export: lm_eval --model hf --model_args pretrained=<export dir>")

    return EngineLM()


@torch.no_grad()
def score(engine, pairs: list[tuple[list[int], list[int]]], seq_length: int, micro_batch_size: int, pad: int):
    """[(context ids, continuation ids)] (at most one micro-batch) -> [(sum of the continuation's log-probs,
    whether every continuation token is the model's top-1)], on every rank. Left-truncated to seq_length + 1
    tokens, as lm-eval's hf model does."""
    from megatron.core import parallel_state, tensor_parallel

    from pretrain import context_parallel
    from pretrain.model import top1_correct
    from pretrain.step import local_logits

    tokens = torch.full((micro_batch_size, seq_length + 1), pad, dtype=torch.long)
    spans = []
    for row, (ctx, cont) in enumerate(pairs):
        whole = (ctx + cont)[-(seq_length + 1):]
        tokens[row, :len(whole)] = torch.tensor(whole)
        spans.append((len(whole) - 1 - len(cont), len(whole) - 1))  # predicting positions of the continuation
    batch = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
             "loss_mask": torch.ones(micro_batch_size, seq_length)}
    logits = local_logits(engine, batch)
    result = torch.zeros(2, micro_batch_size, seq_length, device=device())  # [log-prob, top-1] per position
    if logits is not None:  # (under --cp this rank's chunk of the positions, then every rank's)
        labels = context_parallel.local(batch["labels"].to(device()), 1)
        log_prob = -tensor_parallel.vocab_parallel_cross_entropy(logits.float().clone(), labels.t().contiguous()).t()
        result = context_parallel.gather(torch.stack([log_prob, top1_correct(logits, labels).t().float()]), 2)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast(result, parallel_state.get_pipeline_model_parallel_last_rank(),
                                    group=parallel_state.get_pipeline_model_parallel_group())
    result = result.cpu()
    return [(result[0, row, a:b].sum().item(), bool(result[1, row, a:b].all())) for row, (a, b) in enumerate(spans)]


def evaluate_tasks(lm, tasks: list[str], tasks_dir: str | None, limit: int | None) -> tuple[dict, list[dict]]:
    """-> ({"<task>_<metric>": value}, every request scored); RNG states as they were."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    states = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    lm.scored = []
    try:
        manager = TaskManager(include_path=tasks_dir, include_defaults=tasks_dir is None)
        results = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, limit=limit, log_samples=False,
                                  bootstrap_iters=0, random_seed=None, numpy_random_seed=None,
                                  torch_random_seed=None, fewshot_random_seed=1234)
    finally:
        torch.set_rng_state(states[0])
        if states[1] is not None:
            torch.cuda.set_rng_state_all(states[1])
    flat = {}
    # lm-eval hands results to LOCAL_RANK 0 only (None elsewhere): the ranks that log are among them
    for task, metrics in (results or {}).get("results", {}).items():
        for key, value in metrics.items():
            name, _, _ = key.partition(",")
            if isinstance(value, (int, float)) and not name.endswith("_stderr") and name != "sample_len":
                flat[f"{task}_{name}"] = value
    return flat, lm.scored


def write_scored(log_dir: str, step: int, scored: list[dict]) -> str:
    """Every request's log-likelihood, for comparing with another evaluation of the same task."""
    from common.files import write_text

    path = os.path.join(log_dir, "downstream", f"step-{step:07d}.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_text(path, "".join(json.dumps(s) + "\n" for s in scored))  # atomically: a full disk leaves no half file
    return path
