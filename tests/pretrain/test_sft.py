"""--objective sft (pretrain/sft_data.py, pretrain/objectives.py): whole conversations packed into samples, attention
and positions inside each, the loss over the answer tokens of the global batch; the same step under every layout;
a killed fine-tune resumes bit-identically; data format and objective must match."""
import json
import signal

import numpy as np
import pytest
import torch

from conftest import MAIN, common, launch, metrics, read_conversations, spawn_ranks, train_losses, wait_for_step
from pretrain import sft_data as sft
from pretrain.config import preset


def packed(sft_data_dir, seq_length=64, num_samples=0):
    conversations = sft.Conversations(sft.conversation_shards(sft_data_dir))
    return sft.PackedConversations(conversations, seq_length, seed=3, num_samples=num_samples, pad_id=0)


# ------------------------------------------------------------------------------------------------ packing
def test_every_conversation_is_packed_whole_once_per_epoch_with_its_mask(sft_data):
    ds = packed(sft_data, num_samples=10**3)
    docs = read_conversations(sft_data)
    lengths = np.array([len(ids) for ids, _ in docs])
    assert ds.too_long == 0 and ds.epochs > 1 and 0 < ds.padding < 0.5
    epoch = ds.samples[:ds.per_epoch]
    assert sorted(c for sample in epoch for c in sample) == list(range(len(docs)))  # each once, none split
    assert all(lengths[sample].sum() <= 65 for sample in ds.samples)
    assert ds.samples[ds.per_epoch:2 * ds.per_epoch] != epoch  # another order in the next epoch
    for i in range(ds.per_epoch):
        s, at = ds[i], 0
        full = np.concatenate([s["tokens"], s["labels"][-1:]])
        for k, c in enumerate(ds.samples[i]):
            ids, mask = docs[c]
            n = len(ids)
            assert full[at:at + n].tolist() == ids
            assert (s["document_ids"][at:at + n] == k).all() or at + n == 65  # (the last token is a label only)
            # the label of position j is token j + 1: supervised where its mask says so, within the conversation
            assert s["loss_mask"][at:at + n - 1].tolist() == mask[1:]
            if at + n < 65:
                assert s["loss_mask"][at + n - 1] == 0  # predicting the next conversation's first token: never
            at += n
        assert (s["loss_mask"][at:] == 0).all() and (s["document_ids"][at:] == len(ds.samples[i])).all()


def test_conversations_longer_than_a_sample_are_left_out_and_counted(sft_data):
    docs = read_conversations(sft_data)
    ds = packed(sft_data, seq_length=40)
    too_long = sum(len(ids) > 41 for ids, _ in docs)
    assert ds.too_long == too_long > 0 and f"{too_long} longer than --seq-length + 1 left out" in ds.describe()
    with pytest.raises(sft.DataError, match="none of the .* conversations fits --seq-length 3.*--max-tokens 4"):
        packed(sft_data, seq_length=3)


# ------------------------------------------------------------------------------------------------ the loss
def _model(meta_model_builder, seed=0):
    cfg = preset("tiny", num_layers=2, objective="sft")
    torch.manual_seed(seed)
    model = meta_model_builder(cfg, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return cfg, model


def _batch(ds, indices):
    from pretrain.data import _collate

    return _collate([ds[i] for i in indices])


def test_a_packed_samples_token_losses_equal_each_conversation_alone(sft_data, meta_model_builder):
    """Document ids from the index keep attention and positions inside each conversation (fp32, 1e-5); without
    them the later conversations see the earlier ones (the comparison can fail)."""
    from megatron.core import tensor_parallel

    _, model = _model(meta_model_builder)
    ds = packed(sft_data)
    many = [i for i in range(len(ds)) if len(ds.samples[i]) >= 2][:3]
    assert len(many) == 3
    b = _batch(ds, many)
    with torch.no_grad():
        def token_losses(tokens, labels, doc=None):
            logits = model.logits(tokens, doc)
            return tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels.t().contiguous()).t()

        together = token_losses(b["tokens"], b["labels"], b["document_ids"])
        mixed = token_losses(b["tokens"], b["labels"])
        worst_mixed = 0.0
        for row, i in enumerate(many):
            at = 0
            for c in ds.samples[i]:
                n = len(ds.conversations.get(c)[0]) - 1  # its positions whose label is its own next token
                alone = token_losses(b["tokens"][row:row + 1, at:at + n], b["labels"][row:row + 1, at:at + n])[0]
                assert (together[row, at:at + n] - alone).abs().max() < 1e-5
                worst_mixed = max(worst_mixed, (mixed[row, at:at + n] - alone).abs().max().item())
                at += n + 1
    assert worst_mixed > 1e-3


def test_prompt_targets_change_nothing_and_one_answer_target_changes_loss_and_gradients(sft_data,
                                                                                      meta_model_builder):
    cfg, model = _model(meta_model_builder)
    b = _batch(packed(sft_data), [0, 1])
    rng = torch.Generator().manual_seed(0)

    def loss_and_grads(labels):
        model.zero_grad()
        loss = model(b["tokens"], labels, b["loss_mask"], None, b["document_ids"])
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    base, grads = loss_and_grads(b["labels"])
    prompt = b["loss_mask"] == 0
    assert prompt.any() and (~prompt).any()
    other = torch.where(prompt, torch.randint(0, cfg.vocab_size, b["labels"].shape, generator=rng), b["labels"])
    assert (other != b["labels"]).sum() > prompt.sum() // 2  # most prompt targets really changed
    loss, grads2 = loss_and_grads(other)
    assert torch.equal(loss, base) and all(torch.equal(g, h) for g, h in zip(grads, grads2))
    one = b["labels"].clone()
    r, c = torch.nonzero(~prompt)[0]
    one[r, c] = (one[r, c] + 1) % cfg.vocab_size
    loss, grads3 = loss_and_grads(one)
    assert not torch.equal(loss, base) and not all(torch.equal(g, h) for g, h in zip(grads, grads3))


# ------------------------------------------------------------------------------------------------ layouts
SFT_REF = dict(lr=1e-2, zero=0)


@pytest.mark.slow
def test_every_layout_takes_one_processs_step_on_packed_conversations(train_layout, sft_data):
    """DP 2, TP 2, PP 2, CP 2 (alone and x DP 2 under ZeRO-3: conversations crossing the split keep their document
    ids and the global answer-token count), ZeRO-3 (partitioned) and gradient accumulation 4 equal one process
    (fp32, 1e-5) on packed
    conversations whose supervised tokens differ a lot between micro-batches, where a mean of micro-batch means
    (the rule without global_loss_tokens) takes another step."""
    from test_parallel_equivalence import assert_same

    ds = packed(sft_data)
    per_sample = [float(ds[i]["loss_mask"].sum()) for i in range(8)]
    assert max(per_sample) > 3 * min(per_sample), per_sample
    data = dict(sft_data=sft_data, objective="sft", **SFT_REF)
    ref = train_layout(1, **data, global_loss_tokens=True)
    mean_of_means = train_layout(1, **data)
    assert max(abs(a - b) / b for a, b in zip(ref["losses"], mean_of_means["losses"])) > 1e-3
    for n, layout in ((1, dict(micro_batch_size=1)), (2, dict(zero=3)), (2, dict(tp=2)), (2, dict(pp=2, zero=1)),
                      (2, dict(cp=2)), (4, dict(cp=2, zero=3))):
        run = train_layout(n, **{**data, **layout}, global_loss_tokens=True)
        assert_same(run, ref)
        if layout.get("zero") == 3:
            assert run["partitioned"] > 0


# ------------------------------------------------------------------------------------------------ the trainer
def sft_args(data, tmp, *extra):
    return ["--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--objective", "sft", *common(data, tmp),
            "--seq-length", "64", *map(str, extra)]


@pytest.mark.slow
def test_a_killed_fine_tune_from_a_checkpoint_resumes_bit_identically(tiny_data, sft_data, chat_tokenizer, tmp_path):
    """A clm run's checkpoint starts the fine-tune (weights only); SIGKILL mid-run and the rerun resumes the
    fine-tune's own checkpoint (--init-from-checkpoint then ignored) with the uninterrupted run's losses, bit for
    bit; its export carries the chat template, which transformers applies as prepare rendered it."""
    src = tmp_path / "src"
    launch(1, MAIN, "--deepspeed_config", "ds_configs/zero3.json", "--fp32", "--train-iters", "2", "--save",
           src / "ck", *common(sft_data, src, "--objective", "sft", "--seq-length", "64"))
    args = ["--train-iters", "10", "--save-interval", "4", "--init-from-checkpoint", src / "ck"]
    ref = tmp_path / "ref"
    out = launch(2, MAIN, *sft_args(sft_data, ref, *args, "--save", ref / "ck", "--sample-prompt", "Why?",
                                    "--sample-tokens", "6")).stdout
    assert "initialised from" in out and "conversations packed into" in out and "val answer accuracy" in out, out
    assert "sample: 'Why?' -> " in out, out
    run = tmp_path / "run"
    procs = spawn_ranks(2, sft_args(sft_data, run, *args, "--save", run / "ck"))
    wait_for_step(run, 5, procs)
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert (run / "ck" / "latest").read_text() == "iter_0000004"
    out = launch(2, MAIN, *sft_args(sft_data, run, *args, "--save", run / "ck")).stdout
    assert "is not read: resuming from" in out and "at iteration 4" in out, out
    want, got = train_losses(metrics(ref)), train_losses(metrics(run))
    assert [got[s] for s in range(5, 11)] == [want[s] for s in range(5, 11)]  # bit-identical
    # the export: the template prepare rendered with, in the tokenizer transformers loads
    from pretrain.export import export
    from transformers import AutoTokenizer

    hf_dir = export(str(ref / "ck"), str(tmp_path / "hf"), dtype="float32")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    messages = [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because."}]
    ids = tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    from data_prep import chat
    from data_prep.tokenizer import load

    assert list(ids) == chat.encode(messages, chat.load_template(chat_tokenizer), load(chat_tokenizer))[0]
    gen = json.load(open(f"{hf_dir}/generation_config.json"))
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]


@pytest.mark.slow
def test_the_trainer_refuses_data_of_another_objective_naming_the_fix(tiny_data, sft_data, tmp_path):
    out = launch(1, MAIN, *sft_args(tiny_data, tmp_path, "--train-iters", "1"), check=False)
    assert out.returncode == 2 and "holds text data, which --objective sft does not train on" in out.stderr
    out = launch(1, MAIN, "--deepspeed_config", "ds_configs/zero3.json", *common(sft_data, tmp_path),
                 "--train-iters", "1", check=False)
    assert out.returncode == 2 and "holds chat data, which --objective clm does not train on" in out.stderr
    assert "pass --objective sft" in out.stderr


def test_sft_starts_from_a_decoder_never_from_an_encoder(tmp_path):
    """clm -> sft is allowed (the same causal layers); mlm -> sft is refused: the encoder learned bidirectional
    attention."""
    from pretrain import checkpoint
    from pretrain.arguments import parse_args
    from pretrain.main import model_config
    from pretrain.parallel import LayoutError

    for source in ("clm", "mlm"):
        tag = tmp_path / source / "iter_0000001"
        tag.mkdir(parents=True)
        (tag / checkpoint.META).write_text(json.dumps({
            "format": checkpoint.FORMAT, "iteration": 1, "consumed_samples": 4, "layout": {}, "files": {},
            "model_config": preset("tiny", objective=source).__dict__}))
        args = parse_args(["--deepspeed_config", "ds_configs/zero3.json", "--data-path", "d", "--train-iters", "1",
                           "--objective", "sft", "--init-from-checkpoint", str(tag)])
        if source == "clm":
            assert model_config(args, 400).objective == "sft"
        else:
            with pytest.raises(LayoutError, match="cannot start from .* trained as mlm: its attention is bidirect"):
                model_config(args, 400)


def test_an_empty_validation_part_and_mixed_templates_are_refused(sft_data, tmp_path):
    from pretrain.data import DataConfig

    cfg = DataConfig(data_path=[sft_data], split="99.9,0.1,0", seq_length=64)
    with pytest.raises(sft.DataError, match="no conversation falls in the valid part of --split 99.9,0.1,0"):
        sft.build_datasets(cfg, (10, 10, 0), pad_id=0)
    assert sft.build_datasets(DataConfig(data_path=[sft_data], split="100,0,0", seq_length=64), (10, 10, 0), 0)[1] \
        is None  # a part of share 0 is not asked for
    other = tmp_path / "other"
    other.mkdir()
    man = json.loads(open(f"{sft_data}/manifest.json").read())
    man["data"]["chat_template"] = {**man["data"]["chat_template"], "sha256": "0" * 64, "name": "other.jinja"}
    (other / "manifest.json").write_text(json.dumps(man))
    assert sft.chat_template([sft_data])["sha256"] != "0" * 64
    with pytest.raises(sft.DataError, match="mixes conversations rendered with different chat templates"):
        sft.chat_template([sft_data, str(other)])
