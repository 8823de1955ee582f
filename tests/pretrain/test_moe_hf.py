"""A mixture of experts in and out of Hugging Face as Mixtral (pretrain/hf.py, the MoE family table): a random
Mixtral built with transformers is imported under expert and tensor parallelism, in both of its namings (the
per-expert w1/w2/w3 that save_pretrained and the Hub write, and the fused gate_up_proj/down_proj of transformers 5's
modules); our logits equal transformers', the first step's loss equals its loss, export gives back
save_pretrained's tensors bit for bit, and a model we trained exports to logits transformers reproduces."""
import json
import os

import pytest
import torch

import hf_models
from conftest import LAYOUT_SAVE_AT, WORKERS, launch

pytestmark = pytest.mark.slow

SEQ = 16  # tests/workers/hf_import.py
# (ranks, TP, EP, ZeRO, sequence parallel): one process; EP 2; TP 2 (with sequence parallelism, which megatron's
# MoE needs under TP) under ZeRO-3
LAYOUTS = [(1, 1, 1, 1, False), (2, 1, 2, 1, False), (2, 2, 1, 3, True)]


def _lid(layout):
    n, tp, ep, zero, _ = layout
    return f"tp{tp}-ep{ep}-dp{n // tp}-zero{zero}"


def _seqs(vocab, n, seed):
    return torch.randint(0, vocab, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


def _fused_copy(hf_dir, out) -> str:
    """The same model under transformers 5's module names (the experts fused: mlp.experts.gate_up_proj [E, 2f, h],
    mlp.experts.down_proj [E, h, f], the router mlp.gate), as a checkpoint written from its state_dict holds it."""
    from safetensors.torch import save_file

    os.makedirs(out)
    state = hf_models.load(hf_dir).state_dict()
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return str(out)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-hf")
    legacy = hf_models.build("mixtral", root / "mixtral", seed=3)
    return {"mixtral": legacy, "fused": _fused_copy(legacy, root / "fused")}


@pytest.fixture(scope="module")
def imported(moe_dirs, tmp_path_factory):
    cache = {}

    def run(layout):
        if layout not in cache:
            n, tp, ep, zero, sp = layout
            out = tmp_path_factory.mktemp(_lid(layout))
            launch(n, WORKERS / "hf_import.py", "--hf", *moe_dirs.values(), "--tp", tp, "--ep", ep, "--zero", zero,
                   *(["--sequence-parallel"] if sp else []), "--out", out, timeout=600)
            cache[layout] = out
        return cache[layout]

    return run


def test_save_pretrained_writes_per_expert_tensors(moe_dirs):
    """What the two directories hold really differs (the fused reader path is exercised)."""
    from safetensors import safe_open

    with safe_open(os.path.join(moe_dirs["mixtral"], "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in f.keys()
    with safe_open(os.path.join(moe_dirs["fused"], "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
        assert not any("block_sparse_moe" in k for k in f.keys())


@pytest.mark.parametrize("layout", LAYOUTS, ids=_lid)
def test_imported_mixtral_computes_transformers_logits_and_loss(moe_dirs, imported, layout):
    out = imported(layout)
    report = json.loads((out / "report.json").read_text())
    vocab = hf_models.config("mixtral").vocab_size
    theirs, _ = hf_models.logits_and_loss(moe_dirs["mixtral"], _seqs(vocab, 2, seed=1))
    _, their_loss = hf_models.logits_and_loss(moe_dirs["mixtral"], _seqs(vocab, 4, seed=2))
    for name in moe_dirs:
        ours = torch.load(out / f"{name}-logits.pt", weights_only=True)
        err = (ours - theirs).abs().max().item()
        print(f"{_lid(layout)} {name}: max |ours - HF| logits {err:.2e}; first loss {report[name]['first_loss']:.6f} "
              f"vs HF {their_loss:.6f}")
        assert ours.shape == theirs.shape and err < 1e-4, name
        assert report[name]["first_loss"] == pytest.approx(their_loss, rel=1e-5), name


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=_lid)
def test_mixtral_round_trip_gives_back_save_pretrained_tensors(moe_dirs, imported, layout, tmp_path):
    from safetensors.torch import load_file

    from pretrain.export import export

    original = load_file(os.path.join(moe_dirs["mixtral"], "model.safetensors"))
    for name in moe_dirs:  # from either naming: the per-expert tensors save_pretrained writes
        export(str(imported(layout) / f"{name}-ck"), str(tmp_path / name), dtype="float32")
        back = load_file(str(tmp_path / name / "model.safetensors"))
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
        # the load-balancing weight: per layer here, pooled over layers there (pretrain.hf.aux_coeff_from_hf)
        assert config["router_aux_loss_coef"] == hf_models.config("mixtral").router_aux_loss_coef
        assert sorted(back) == sorted(original), name
        for key, t in original.items():
            assert torch.equal(back[key], t), (name, key)


def test_trained_moe_exports_to_logits_transformers_reproduces(train_layout, tmp_path):
    """A model trained here under EP 2 (4 steps past the checkpoint's: the experts and router moved from their
    initialisation) exported as Mixtral; transformers' from_pretrained computes our logits."""
    from transformers import AutoModelForCausalLM

    from pretrain.export import export

    run = train_layout(2, cfg="num_experts=4 moe_aux_loss_coeff=0.1 moe_z_loss_coeff=0.01", ep=2, zero=1,
                       micro_batch_size=2, global_batch_size=8)
    export(str(run["dir"] / "ck"), str(tmp_path / "model"), dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    ours = torch.load(run["dir"] / f"logits-{LAYOUT_SAVE_AT}.pt", weights_only=True)
    with torch.no_grad():
        theirs = model(ours["tokens"]).logits.float()
    err = (theirs - ours["logits"]).abs().max().item()
    print(f"EP 2 trained MoE -> Mixtral: max |HF - ours| = {err:.2e}")
    assert type(model).__name__ == "MixtralForCausalLM" and err < 1e-4


@pytest.mark.parametrize("field, value, words", [("num_experts_per_tok", 1, "renormalises"),
                                                 ("router_jitter_noise", 0.01, "jitter")])
def test_a_mixtral_we_cannot_reproduce_is_refused(tmp_path, field, value, words):
    from pretrain import hf

    cfg = hf_models.config("mixtral").to_dict()
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, field: value}))
    with pytest.raises(hf.HFConfigError, match=f"{field}.*{words}"):
        hf.model_config(str(tmp_path / "m"))


@pytest.mark.parametrize("overrides, words", [(dict(moe_top_k=1), "top-1"),
                                              (dict(moe_shared_expert_size=32), "shared expert")])
def test_a_mixture_no_hugging_face_family_computes_is_not_exported(overrides, words):
    from pretrain import hf
    from pretrain.config import preset

    with pytest.raises(ValueError, match=words):
        hf.export_family(preset("tiny", num_experts=4, **overrides))


def test_import_command_cuts_mixtral_for_tp_and_exports_it_back(moe_dirs, tmp_path):
    """python -m pretrain.import_hf --tp 2 on a Mixtral (experts split over TP as the dense MLP), then export:
    save_pretrained's tensors, bit for bit."""
    from safetensors.torch import load_file

    from pretrain.export import export
    from pretrain.import_hf import import_hf

    import_hf(moe_dirs["fused"], str(tmp_path / "ck"), tp=2)
    export(str(tmp_path / "ck"), str(tmp_path / "hf"), dtype="float32")
    original = load_file(os.path.join(moe_dirs["mixtral"], "model.safetensors"))
    back = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], t) for k, t in original.items())
