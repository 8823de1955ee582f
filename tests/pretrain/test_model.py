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
