"""pretrain.model: opt-in kernels change kernels, not results."""
import pytest
import torch

from pretrain.config import preset


@pytest.mark.slow
def test_speedups_compute_the_same_layer(meta_model_builder):
    """--fused-swiglu and --compile change kernels, not results."""
    from pretrain.model import apply_speedups

    cfg = preset("tiny", num_layers=1)
    torch.manual_seed(0)
    eager = meta_model_builder(cfg, device="cpu")
    for p in eager.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fast = meta_model_builder(cfg, device="cpu")
    fast.load_state_dict(eager.state_dict())
    apply_speedups(fast, compile_layers=True, fused_swiglu=True)
    block = fast.get_submodule("1")
    assert block.layer.config.bias_activation_fusion and "_layer" in vars(block)  # really switched on
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length))
    losses = []
    for model in (eager, fast):
        loss = model(tokens, tokens.roll(-1, 1))
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name


# ------------------------------------------------------------------------------------------ document masking
def _random_model(builder, cfg, **options):
    torch.manual_seed(0)
    model = builder(cfg, device="cpu", **options)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def _packed(eod, lengths, vocab, seed):
    """Documents of the given lengths (each ending with EOD but the last, cut off) back to back."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for n in lengths:
        d = torch.randint(0, vocab, (n,), generator=g)
        d[d == eod] = eod + 1
        d[-1] = eod
        docs.append(d)
    docs[-1] = docs[-1][:-1]
    return torch.cat(docs), [len(d) for d in docs]


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_document_mask_equals_each_document_alone(meta_model_builder, objective):
    """Per-token logits (so losses) of a packed sample with --document-mask equal those of each document run
    alone; without the mask, the later documents see the earlier ones (the comparison can fail)."""
    from pretrain.model import document_ids, document_positions

    eod = 5
    cfg = preset("tiny", num_layers=2, seq_length=64, objective=objective)
    masked = _random_model(meta_model_builder, cfg, document_eod=eod)
    plain = _random_model(meta_model_builder, cfg)
    rows = [_packed(eod, [9, 1, 30, 25], cfg.vocab_size, seed=1), _packed(eod, [40, 25], cfg.vocab_size, seed=2)]
    tokens = torch.stack([t for t, _ in rows])
    assert document_ids(tokens, eod)[0].tolist() == [0] * 9 + [1] + [2] * 30 + [3] * 24
    assert document_positions(document_ids(tokens, eod))[0, 10:13].tolist() == [0, 1, 2]
    with torch.no_grad():
        packed = masked.logits(tokens).transpose(0, 1)
        unmasked = plain.logits(tokens).transpose(0, 1)
        worst_mixed = 0.0
        for b, (_, lengths) in enumerate(rows):
            start = 0
            for n in lengths:
                alone = plain.logits(tokens[b:b + 1, start:start + n]).transpose(0, 1)[0]
                err = (packed[b, start:start + n] - alone).abs().max().item()
                assert err < 1e-5, (b, start, n, err)
                worst_mixed = max(worst_mixed, (unmasked[b, start:start + n] - alone).abs().max().item())
                start += n
    assert worst_mixed > 1e-3  # packing without the mask is another computation


@pytest.mark.parametrize("causal", [True, False])
def test_flex_attention_path_equals_the_dense_mask(causal):
    """The GPU path (FlexAttention with a block mask built from the document ids) computes the CPU path's
    attention (SDPA with the dense mask). Run eagerly on CPU, forward only: torch 2.13 has no FlexAttention
    backward on CPU; the mask, which is ours, is what both directions share."""
    from torch.nn.attention.flex_attention import flex_attention

    from pretrain.model import document_block_mask, document_ids, document_mask

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (2, 256), generator=g)
    doc = document_ids(tokens, eod=3)
    q = torch.randn(2, 4, 256, 16, generator=g)
    k, v = (torch.randn(2, 2, 256, 16, generator=g) for _ in range(2))
    flex = flex_attention(q, k, v, block_mask=document_block_mask(doc, causal), enable_gqa=True)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(doc, causal),
                                                             enable_gqa=True)
    assert (flex - dense).abs().max() < 1e-5
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert (flex - plain).abs().max() > 1e-2  # the mask is not a no-op here


def test_the_block_mask_cache_never_hands_one_micro_batch_another_ones_mask():
    """The cache is keyed by the tensor object, not its memory: the next micro-batch's ids, even if they land at
    the same address, get their own mask."""
    from pretrain.model import document_block_mask, document_ids, document_mask

    a = document_ids(torch.tensor([[1, 3, 1, 1, 3, 1, 1, 1] * 16]), eod=3)
    first = document_block_mask(a, True)
    assert document_block_mask(a, True) is first  # the same ids: the same mask (every layer of one pass)
    b = a.clone()
    b.copy_(document_ids(torch.tensor([[3, 1, 1, 1, 1, 1, 3, 1] * 16]), eod=3))
    second = document_block_mask(b, True)
    assert second is not first
    q = torch.randn(1, 1, 128, 8)
    from torch.nn.attention.flex_attention import flex_attention

    dense = torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=document_mask(b, True))
    assert (flex_attention(q, q, q, block_mask=second) - dense).abs().max() < 1e-5
