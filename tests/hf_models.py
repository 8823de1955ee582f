"""Small random Hugging Face models of each family pretrain/hf.py imports, built locally with transformers' own
config classes and save_pretrained (no download). Every weight is random, biases and norm weights included, so a
tensor loaded into the wrong place or skipped changes the logits."""
from __future__ import annotations

import shutil

import torch

# Each stresses something else: Llama tied with Llama 3.1's rope scaling; Mistral untied with one key/value head
# per two query heads; Qwen2 with q/k/v biases, sharded files (an index) and a vocabulary no TP size divides.
FAMILIES = {
    "llama": dict(vocab_size=1001, tie_word_embeddings=True, num_key_value_heads=2, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8}),
    "mistral": dict(vocab_size=999, tie_word_embeddings=False, num_key_value_heads=2, sliding_window=None,
                    rope_theta=1e6),
    "qwen2": dict(vocab_size=1003, tie_word_embeddings=False, num_key_value_heads=2, rope_theta=1e6,
                  rms_norm_eps=1e-6),
}
# The mixture of experts (pretrain/moe.py): Mixtral, 4 experts of which 2 per token, untied, GQA. Kept apart from
# FAMILIES: the dense families' tests run layouts (PP) that a mixture of experts refuses (tests/pretrain/test_moe.py).
MOE_FAMILIES = {
    "mixtral": dict(vocab_size=997, tie_word_embeddings=False, num_key_value_heads=2, rope_theta=1e6,
                    num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
}
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def config(family: str, **over):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config, "mixtral": transformers.MixtralConfig}[family]
    return cls(**{**SHAPE, **{**FAMILIES, **MOE_FAMILIES}[family], **over})


def build(family: str, out_dir, seed: int = 0, tokenizer_dir=None, **over) -> str:
    """Save a random model of `family` to out_dir (fp32 safetensors; Qwen2's in several files), with the tokenizer
    files of tokenizer_dir if given; -> out_dir."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config(family, **over), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    model.save_pretrained(out_dir, max_shard_size="40KB" if family == "qwen2" else "5GB")
    if tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = f"{tokenizer_dir}/{name}"
            try:
                shutil.copy(src, out_dir)
            except FileNotFoundError:
                pass
    return str(out_dir)


def load(hf_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def logits_and_loss(hf_dir, seqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The HF model's logits on seqs[:, :-1] and its mean next-token loss against seqs[:, 1:]."""
    model = load(hf_dir)
    with torch.no_grad():
        logits = model(input_ids=seqs[:, :-1]).logits.float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), seqs[:, 1:].reshape(-1))
    return logits, loss.item()
