"""Sampling from the model being trained (every rank takes part: ZeRO-3 gathers and TP need all of them)."""
from __future__ import annotations

import torch

from pretrain.compat import device


@torch.no_grad()
def generate(engine, tokenizer, prompt: str, max_new_tokens: int, cfg, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0) -> str:
    from megatron.core import tensor_parallel

    from pretrain.step import is_pipeline

    if is_pipeline(engine):
        return "(sampling is not implemented for pipeline-parallel runs)"
    gen = torch.Generator().manual_seed(seed)  # same draw on every rank, so all ranks agree on the tokens
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [0]
    engine.eval()
    try:
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-cfg.seq_length:]], device=device())
            logits = engine(window)  # [s, 1, vocab/tp]
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits[-1, 0].float().contiguous())
            logits = logits[: cfg.vocab_size].cpu() / temperature  # drop the padded vocabulary
            top = torch.topk(logits, min(top_k, logits.numel()))
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
            ids.append(int(top.indices[choice]))
    finally:
        engine.train()
    return tokenizer.decode(ids)
