"""Sampling from the model being trained (every rank takes part: ZeRO-3 gathers and TP need all of them)."""
from __future__ import annotations

import torch

from pretrain.compat import device


@torch.no_grad()
def generate(engine, tokenizer, prompt: str, max_new_tokens: int, cfg, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0, chat_template: dict | None = None) -> str:
    """chat_template (a fine-tune's, from its data manifest): the prompt is sent as a user turn through it, and
    generation stops at its end-of-turn token; the answer alone is returned."""
    from megatron.core import tensor_parallel

    from pretrain.step import is_pipeline

    if is_pipeline(engine):
        return "(sampling is not implemented for pipeline-parallel runs)"
    gen = torch.Generator().manual_seed(seed)  # same draw on every rank, so all ranks agree on the tokens
    stop = None
    if chat_template:
        from data_prep.chat import ChatTemplate

        template = ChatTemplate(chat_template["source"], chat_template["end_of_turn"],
                                chat_template.get("variables", {}), chat_template["name"])
        prompt = template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        stop = tokenizer.token_to_id(chat_template["end_of_turn"])
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [0]
    start = len(ids)
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
            if ids[-1] == stop:
                break
    finally:
        engine.train()
    return tokenizer.decode(ids[start:] if chat_template else ids)


def hf_sample(hf_dir: str, prompt: str, max_new_tokens: int = 48, seed: int = 0) -> str:
    """Sample from an exported model with transformers alone (AutoModelForCausalLM + AutoTokenizer): what a user
    of the export gets, without any of this project's code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=0.8, top_k=40,
                         pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m pretrain.generate",
                                description="Sample from an exported Hugging Face model with transformers.")
    p.add_argument("--hf", required=True, help="directory written by python -m pretrain.export")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(f"transformers sample: {a.prompt!r} -> {hf_sample(a.hf, a.prompt, a.tokens, a.seed)!r}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
