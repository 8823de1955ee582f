"""Continued pretraining from Hugging Face weights (pretrain/hf.py): small random Llama / Mistral / Qwen2 models
built locally (tests/hf_models.py) are imported under every kind of layout. Our logits equal transformers' on
the same batch, the first training step's loss equals transformers' loss on its tokens, and HF -> ours -> export
-> HF gives back the same tensors, bit for bit (fp32). A config we cannot reproduce is refused naming its field.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import hf_models
from conftest import MAIN, ROOT, WORKERS, common, launch, metrics, train_losses

FAMILIES = sorted(hf_models.FAMILIES)
# (ranks, TP, PP, ZeRO): TP 1/2, PP 1/2, ZeRO 1/3, and the default layout (ZeRO-3, DP 2)
LAYOUTS = [(1, 1, 1, 1), (2, 2, 1, 3), (2, 1, 2, 1), (2, 1, 1, 3)]
SEQ = 16  # tests/workers/hf_import.py


def _seqs(vocab, n, seed):
    return torch.randint(0, vocab, (n, SEQ + 1), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: hf_models.build(f, root / f, seed=i) for i, f in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def imported(hf_dirs, tmp_path_factory):
    """layout -> the worker's output directory (report.json, <family>-logits.pt, <family>-ck/)."""
    cache = {}

    def run(layout):
        if layout not in cache:
            n, tp, pp, zero = layout
            out = tmp_path_factory.mktemp(f"import-tp{tp}-pp{pp}-z{zero}-n{n}")
            launch(n, WORKERS / "hf_import.py", "--hf", *hf_dirs.values(), "--tp", tp, "--pp", pp, "--zero", zero,
                   "--out", out, timeout=600)
            cache[layout] = out
        return cache[layout]

    return run


def _lid(layout):
    n, tp, pp, zero = layout
    return f"tp{tp}-pp{pp}-dp{n // (tp * pp)}-zero{zero}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=_lid)
def test_imported_model_computes_transformers_logits_and_loss(hf_dirs, imported, layout):
    out = imported(layout)
    report = json.loads((out / "report.json").read_text())
    for family, hf_dir in hf_dirs.items():
        vocab = hf_models.config(family).vocab_size
        theirs, _ = hf_models.logits_and_loss(hf_dir, _seqs(vocab, 2, seed=1))
        ours = torch.load(out / f"{family}-logits.pt", weights_only=True)
        assert ours.shape == theirs.shape, (family, ours.shape, theirs.shape)  # vocabulary padding dropped
        err = (ours - theirs).abs().max().item()
        _, their_loss = hf_models.logits_and_loss(hf_dir, _seqs(vocab, 4, seed=2))
        r = report[family]
        print(f"{_lid(layout)} {family}: max |ours - HF| logits {err:.2e}; first loss {r['first_loss']:.6f} vs HF "
              f"{their_loss:.6f}")
        assert err < 1e-4, family
        assert r["first_loss"] == pytest.approx(their_loss, rel=1e-5), family
        if layout[3] == 3 and layout[0] // layout[1] > 1:  # ZeRO-3 with DP 2: the weights really are partitioned
            assert r["partitioned"] > 0, r


@pytest.mark.slow
@pytest.mark.parametrize("layout", [LAYOUTS[1], LAYOUTS[2], LAYOUTS[3]], ids=_lid)
def test_round_trip_gives_back_the_same_tensors(hf_dirs, imported, layout, tmp_path):
    from safetensors.torch import load_file

    from pretrain.export import export

    out = imported(layout)
    for family, hf_dir in hf_dirs.items():
        original = {}
        for f in sorted(os.listdir(hf_dir)):
            if f.endswith(".safetensors"):
                original.update(load_file(os.path.join(hf_dir, f)))
        export(str(out / f"{family}-ck"), str(tmp_path / family), dtype="float32")
        back = load_file(str(tmp_path / family / "model.safetensors"))
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == family and config["vocab_size"] == hf_models.config(family).vocab_size
        if hf_models.config(family).tie_word_embeddings:
            original.pop("lm_head.weight", None)
        assert sorted(back) == sorted(original), family
        for name, t in original.items():
            assert torch.equal(back[name], t), (family, name)


def test_a_config_we_cannot_reproduce_is_refused_naming_its_field(tmp_path):
    from pretrain import hf

    cases = {
        "sliding_window": dict(family="mistral", sliding_window=16),
        "num_local_experts": dict(family="llama", num_local_experts=8),
        "rope_scaling": dict(family="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                           "original_max_position_embeddings": 16}),
        "hidden_act": dict(family="qwen2", hidden_act="gelu"),
        "mlp_bias": dict(family="llama", mlp_bias=True),
        "attention_bias": dict(family="llama", attention_bias=True),
        "model_type": dict(family="llama", model_type="gpt2"),
    }
    for field, over in cases.items():
        d = tmp_path / field
        d.mkdir()
        cfg = hf_models.config(over.pop("family")).to_dict()
        cfg.update(over)
        if field == "rope_scaling":
            cfg["rope_parameters"] = {**over["rope_scaling"], "rope_theta": 10000.0}
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=field):
            hf.model_config(str(d))
    # a sliding window as long as the context is no window at all: Mistral's default
    d = tmp_path / "window-off"
    d.mkdir()
    cfg = hf_models.config("mistral").to_dict()
    cfg["sliding_window"] = cfg["max_position_embeddings"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert hf.model_config(str(d)).family == "mistral"


@pytest.mark.slow
def test_import_memory_per_rank_halves_under_tp2(tmp_path):
    """Each rank reads only its slice: peak RSS per rank at TP 2 is about half of TP 1, for a model whose weights
    dominate the process (a 145M-parameter Llama, 580 MB in fp32)."""
    hf_dir = hf_models.build("llama", tmp_path / "big", hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                             num_attention_heads=8, num_key_value_heads=8, vocab_size=32000)
    growth = {}
    for tp in (1, 2):
        out = tmp_path / f"tp{tp}"
        out.mkdir()
        launch(tp, WORKERS / "hf_import.py", "--hf", hf_dir, "--tp", tp, "--zero", 1, "--import-only",
               "--out", out, timeout=600)
        rss = [json.loads((out / f"rss-{r}.json").read_text()) for r in range(tp)]
        growth[tp] = max(r["peak"] - r["before"] for r in rss)
        print(f"TP {tp}: per-rank RSS {rss}")
    ratio = growth[2] / growth[1]
    print(f"peak RSS growth per rank: TP1 {growth[1]:.0f} MiB, TP2 {growth[2]:.0f} MiB ({ratio:.2f}x)")
    assert 0.4 < ratio < 0.65


@pytest.mark.slow
def test_trainer_continues_pretraining_from_a_hugging_face_directory(tiny_tokenizer, tmp_path):
    """As a user would: data_prep with the HF directory as --tokenizer, then the default config (ZeRO-3, DP 2)
    with --init-from-hf; the shape comes from config.json (a contradicting flag is an error naming both), the run
    config records the source, and the export is of the same family."""
    from conftest import prepare_corpus

    hf_dir = hf_models.build("qwen2", tmp_path / "qwen", tokenizer_dir=tiny_tokenizer)
    data = prepare_corpus(tmp_path / "data", hf_dir, n_docs=600, seed=3)
    base = ["--deepspeed_config", "ds_configs/zero3.json", "--init-from-hf", hf_dir, "--train-iters", "3"]
    bad = launch(2, MAIN, *base, "--num-layers", "4", *common(data, tmp_path), check=False)
    assert bad.returncode != 0 and "error: --num-layers 4 contradicts --init-from-hf" in bad.stderr, bad.stderr
    proc = launch(2, MAIN, *base, "--save", tmp_path / "ck", *common(data, tmp_path))
    assert f"initialised from {hf_dir} (qwen2" in proc.stdout and "the optimizer starts fresh" in proc.stdout
    losses = train_losses(metrics(tmp_path))
    assert sorted(losses) == [1, 2, 3]
    meta = json.loads((tmp_path / "ck" / "iter_0000003" / "meta.json").read_text())
    assert meta["run_config"]["init_from_hf"] == os.path.abspath(hf_dir)
    res = subprocess.run([sys.executable, "-m", "pretrain.export", "--load", tmp_path / "ck", "--output",
                          tmp_path / "out"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (tmp_path / "qwen" / "tokenizer.json").read_bytes()


@pytest.mark.slow
def test_import_command_writes_a_checkpoint_any_layout_resumes(hf_dirs, tmp_path):
    """python -m pretrain.import_hf once, then a run under another layout starts from it with the HF weights."""
    res = subprocess.run([sys.executable, "-m", "pretrain.import_hf", "--hf", hf_dirs["mistral"], "--output",
                          tmp_path / "ck", "--tp", "2", "--seq-length", str(SEQ)], cwd=ROOT, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ck" / "latest").read_text() == "iter_0000000"
    from pretrain.export import export

    export(str(tmp_path / "ck"), str(tmp_path / "back"), dtype="float32")
    from safetensors.torch import load_file

    back, orig = load_file(str(tmp_path / "back" / "model.safetensors")), \
        load_file(os.path.join(hf_dirs["mistral"], "model.safetensors"))
    assert sorted(back) == sorted(orig) and all(torch.equal(back[k], orig[k]) for k in orig)
    again = subprocess.run([sys.executable, "-m", "pretrain.import_hf", "--hf", hf_dirs["mistral"], "--output",
                            hf_dirs["mistral"]], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "--output" in again.stderr  # never writes over the source
