"""pretrain.memory: the activation memory README states for each recompute mode is what our model keeps.

Measured as the bytes autograd saves for backward during one forward pass of the whole model (4 layers, hidden
256, 4 heads / 2 query groups, ffn 704, vocabulary 1000, sequence 256, micro-batch 2, bf16, single process).
"""
import pytest
import torch

from pretrain.config import preset
from pretrain.memory import SavedActivations

README_SAVINGS = {"selective": 0.43, "full": 0.86}  # fraction of "none"'s bytes no longer kept


def _saved_bytes(builder, mode: str) -> int:
    cfg = preset("tiny", num_layers=4, hidden_size=256, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=704, seq_length=256, vocab_size=1000)
    torch.manual_seed(0)
    model = builder(cfg, device="cpu", recompute=mode).to(torch.bfloat16).train()
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    meter = SavedActivations(model)
    with meter.measure():
        model(tokens, tokens)
    return meter.bytes


@pytest.mark.parametrize("mode", sorted(README_SAVINGS))
def test_recompute_saves_what_readme_states(meta_model_builder, mode):
    none, this = _saved_bytes(meta_model_builder, "none"), _saved_bytes(meta_model_builder, mode)
    saving = 1 - this / none
    print(f"{mode}: {this} of {none} bytes kept ({saving:.1%} less)")
    assert abs(saving - README_SAVINGS[mode]) < 0.01
