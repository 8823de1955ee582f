"""pretrain/chunked_loss.py (--loss-chunks K): the same loss and gradients as the plain head, under every layout,
with at most one chunk's logits alive."""
import pytest
import torch

from pretrain.config import preset


def _pair(builder, chunks, **cfg_fields):
    """A plain model and a chunked one with the same random weights (vocab 250: padded to 256, so the padding
    columns are masked in both)."""
    cfg = preset("tiny", vocab_size=250, **cfg_fields)
    torch.manual_seed(0)
    plain = builder(cfg, device="cpu")
    with torch.no_grad():
        for p in plain.parameters():
            p.normal_(0, 0.05)
    chunked = builder(cfg, device="cpu", loss_chunks=chunks)
    chunked.load_state_dict(plain.state_dict())
    return cfg, plain, chunked


@pytest.mark.parametrize("chunks", [4, 5])  # 5 does not divide the 64 positions: uneven chunks
@pytest.mark.parametrize("fields", [{}, {"tie_embeddings": True}, {"objective": "mlm"}],
                         ids=["clm", "tied", "mlm"])
def test_chunked_loss_equals_plain_in_every_gradient(meta_model_builder, chunks, fields):
    """Loss, every parameter's gradient and the evaluation accuracy within 1e-6 relative of the plain head, with a
    loss mask that drops tokens (MLM's masked positions, fine-tuning's prompts) and a given loss-token divisor
    (fine-tuning's global batch)."""
    from pretrain.model import ACCURACY

    cfg, plain, chunked = _pair(meta_model_builder, chunks, **fields)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=g)
    mask = (torch.rand(2, cfg.seq_length, generator=g) > 0.4).float()
    results = []
    for model, loss_tokens in ((plain, None), (chunked, None), (plain, torch.tensor([50.0])),
                               (chunked, torch.tensor([50.0]))):
        model.zero_grad()
        with ACCURACY.counting():
            loss = model(tokens, tokens.roll(-1, 1), mask, loss_tokens)
        loss.backward()
        results.append((loss.item(), ACCURACY.result, {n: p.grad.clone() for n, p in model.named_parameters()}))
    for (loss_a, acc_a, grads_a), (loss_b, acc_b, grads_b) in (results[:2], results[2:]):
        assert loss_b == pytest.approx(loss_a, rel=1e-6) and acc_a == acc_b
        for name, grad in grads_a.items():
            err = (grads_b[name] - grad).abs().max() / grad.abs().max()
            assert err <= 1e-6, (name, err.item())
    assert results[0][0] != pytest.approx(results[2][0], rel=1e-3)  # the divisor really differs


def test_gradient_comparison_catches_a_wrong_recompute(meta_model_builder, monkeypatch):
    """Mutation: a backward whose recomputed logits leave the vocabulary padding unmasked (the forward's are
    masked) fails the comparison above."""
    import torch.nn.functional as F

    from pretrain import chunked_loss

    real = chunked_loss._chunk_logits
    in_backward = lambda: torch._C._current_graph_task_id() != -1  # noqa: E731
    monkeypatch.setattr(chunked_loss, "_chunk_logits",
                        lambda h, w, *vocab: F.linear(h, w) if in_backward() else real(h, w, *vocab))
    cfg, plain, chunked = _pair(meta_model_builder, 4)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    for model in (plain, chunked):
        loss = model(tokens, tokens.roll(-1, 1), torch.ones_like(tokens))
        loss.backward()
    assert loss.item() == pytest.approx(plain(tokens, tokens.roll(-1, 1)).item(), rel=1e-6)  # forward untouched
    worst = max(((b.grad - a.grad).abs().max() / a.grad.abs().max()).item()
                for a, b in zip(plain.parameters(), chunked.parameters()))
    assert worst > 1e-3


def test_chunked_loss_cuts_the_loss_phase_peak_memory(meta_model_builder):
    """Vocabulary 32k, seq 2048, one process: the peak bytes allocated during the head's forward and backward
    (pretrain.memory.peak_allocated_bytes: the profiler's allocation events on CPU) drop by at least 60% with 4
    chunks (one chunk's fp32 logits instead of the whole sequence's, and their gradient)."""
    from pretrain.config import ModelConfig
    from pretrain.memory import head_peak_bytes

    meta_model_builder  # noqa: B018  (initialises torch.distributed and megatron's parallel state)
    cfg = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=32000, seq_length=2048)
    peaks = {chunks: head_peak_bytes(cfg, chunks) for chunks in (1, 4)}
    logits_bytes = cfg.seq_length * cfg.padded_vocab_size * 4
    print(f"loss-phase peak: plain {peaks[1] / 2**20:.1f} MiB, 4 chunks {peaks[4] / 2**20:.1f} MiB "
          f"({1 - peaks[4] / peaks[1]:.0%} less; one fp32 logits tensor is {logits_bytes / 2**20:.1f} MiB)")
    assert peaks[1] >= logits_bytes  # the measure sees the logits at all
    assert peaks[4] <= 0.4 * peaks[1]


def test_loss_chunks_option_is_checked_before_anything_is_built():
    from pretrain.main import loss_chunks
    from pretrain.parallel import LayoutError, validate_layout

    cfg = preset("tiny")
    layout = validate_layout(cfg, 1, 1, 1, 3, 2, 4)
    assert loss_chunks("4", cfg, layout, "none", False) == 4
    for bad in ("0", "x", str(cfg.seq_length + 1)):
        with pytest.raises(LayoutError, match="--loss-chunks .*whole number from 1 .* or auto"):
            loss_chunks(bad, cfg, layout, "none", False)
    auto = loss_chunks("auto", cfg, layout, "none", False)
    assert auto & (auto - 1) == 0 and 1 <= auto <= cfg.seq_length
    cp2 = validate_layout(cfg, 2, 1, 1, 3, 2, 4, cp=2)  # a rank holds half the sequence
    assert loss_chunks(str(cfg.seq_length // 2), cfg, cp2, "none", False) == cfg.seq_length // 2
    with pytest.raises(LayoutError, match="sequence length 32 \\(--seq-length / --cp 2\\)"):
        loss_chunks(str(cfg.seq_length // 2 + 1), cfg, cp2, "none", False)


# ---------------------------------------------------------------------------- every layout (slow: real ranks)
REF = dict(zero=0, micro_batch_size=2, global_batch_size=4)


@pytest.mark.slow
@pytest.mark.parametrize("n, layout", [
    (2, dict(tp=2)), (2, dict(tp=2, sequence_parallel=True)), (2, dict(pp=2, zero=1)),
    (2, dict(pp=2, zero=1, tie=True)), (2, dict(zero=3)), (2, dict(zero=3, tie=True))],
    ids=["tp2", "tp2-sp", "pp2", "pp2-tied", "zero3", "zero3-tied"])
def test_chunked_loss_equals_plain_under_every_layout(train_layout, n, layout):
    """Same layout with and without --loss-chunks 4: losses and grad norms of 8 steps within 1e-6 relative, and
    the logits of a held-out batch after step 3 (so the weights every gradient updated) within 1e-5 of their
    largest."""
    from conftest import LAYOUT_SAVE_AT

    plain = train_layout(n, **{**REF, **layout})
    chunked = train_layout(n, **{**REF, **layout}, loss_chunks=4)
    for key in ("losses", "grad_norms"):
        for a, b in zip(plain[key], chunked[key]):
            assert abs(a - b) <= 1e-6 * abs(a), (key, plain[key], chunked[key])
    a, b = (torch.load(r["dir"] / f"logits-{LAYOUT_SAVE_AT}.pt", weights_only=True)["logits"]
            for r in (plain, chunked))
    assert (a - b).abs().max() <= 1e-5 * a.abs().max(), ((a - b).abs().max(), a.abs().max())
