"""pretrain/context_parallel.py (--cp N): every layout with the sequence split across CP ranks trains the model one
process trains (fp32, CPU gloo, real DeepSpeed and megatron-core), keeps the document mask across the split, and
gives every rank the same attention work."""
import pytest
import torch

from conftest import LAYOUT_SAVE_AT
from pretrain.config import preset
from pretrain.parallel import LayoutError, validate_layout

REF = dict(zero=0, micro_batch_size=2, global_batch_size=4)
DOC = dict(document_eod=0)  # the worker's batches then hold a document boundary every few tokens


def assert_same(run, ref, rtol=1e-5):
    assert len(run["losses"]) == len(ref["losses"]) >= 5
    for key in ("losses", "grad_norms"):
        for a, b in zip(run[key], ref[key]):
            assert abs(a - b) <= rtol * abs(b), (key, run[key], ref[key])


def _logits(run):
    return torch.load(run["dir"] / f"logits-{LAYOUT_SAVE_AT}.pt", weights_only=True)["logits"]


@pytest.mark.slow
@pytest.mark.parametrize("n, layout, extra", [
    (2, {}, {}),
    (2, {}, DOC),
    (4, dict(tp=2), {}),
    (4, dict(tp=2, sequence_parallel=True), DOC),
    (4, dict(zero=3), {}),
    (4, dict(pp=2, zero=1), DOC),
    (2, dict(recompute="full"), DOC),
    (2, {}, dict(objective="mlm")),
    (2, {}, dict(loss_chunks=4)),
], ids=["cp2", "cp2-docmask", "tp2-cp2", "tp2-sp-cp2-docmask", "cp2-dp2-zero3", "cp2-pp2-docmask",
        "cp2-full-recompute", "cp2-mlm", "cp2-loss-chunks"])
def test_context_parallel_equals_one_process(train_layout, n, layout, extra):
    """CP 2 (with TP, SP, ZeRO-3 over DP x CP, PP, recompute, MLM, the chunked loss): the losses and grad norms of
    8 steps within 1e-5 relative of one process, and the logits of a held-out batch after step 3 (gathered over
    CP) within 1e-3 of their largest (they agree to ~1e-6 but at one sensitive position of the held-out batch,
    where TP 2 alone, without CP, differs from one process by 1.1e-4 as well). That the document mask changes the
    model at all, so that its comparison means something, is test_parallel_equivalence.py's."""
    ref = train_layout(1, **REF, **extra)
    run = train_layout(n, **{**REF, **layout}, **extra, cp=2)
    assert_same(run, ref)
    a, b = _logits(ref), _logits(run)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max(), ((a - b).abs().max(), a.abs().max())
    if "document_eod" in extra:  # documents cross the CP split (tested on the held-out batch, same rule)
        from pretrain.model import document_ids

        tokens = torch.load(ref["dir"] / f"logits-{LAYOUT_SAVE_AT}.pt", weights_only=True)["tokens"]
        doc, middle = document_ids(tokens, 0), tokens.size(1) // 2
        assert (doc[:, middle - 1] == doc[:, middle]).any() and doc.max() > 0
    if layout.get("zero") == 3:  # ZeRO-3 really partitioned over all 4 ranks (DP 2 x CP 2)
        assert run["partitioned"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("n, layout", [(2, {}), (4, dict(tp=2))], ids=["cp2", "tp2-cp2"])
def test_planned_all_to_all_bytes_are_what_a_run_moves(train_layout, n, layout):
    """pretrain.plan.cp_all_to_all_bytes (fp32 here) x layers x micro-batches = the all-to-all bytes each rank
    handed to torch.distributed in every step (CollectiveTracker). TP 2: the one key/value group per TP rank
    travels repeated to the 2 query heads."""
    from pretrain.plan import cp_all_to_all_bytes

    cfg = preset("tiny")
    run = train_layout(n, **{**REF, **layout}, cp=2)
    micro_batches = REF["global_batch_size"] // (REF["micro_batch_size"] * (n // (2 * layout.get("tp", 1))))
    planned = cp_all_to_all_bytes(cfg, layout.get("tp", 1), 2, cfg.seq_length, REF["micro_batch_size"], 4)
    for rank in run["ranks"]:
        for step, kinds in rank["collective_bytes"].items():
            assert kinds["all_to_all 2"] == planned * cfg.num_layers * micro_batches, (step, kinds)


def test_heads_split_gives_every_rank_equal_attention_work_and_a_contiguous_split_does_not():
    """Counted on a real causal document mask (documents crossing the split): the all-to-all split gives each of
    the 4 CP ranks the same (query, key) pairs; a ring over contiguous chunks gives the last rank far more."""
    from pretrain.context_parallel import attention_work
    from pretrain.model import document_ids

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (2, 256), generator=g)
    tokens[torch.rand(2, 256, generator=g) < 0.02] = 0  # EOD: documents of ~50 tokens, crossing chunk ends
    doc = document_ids(tokens, 0)
    for causal in (True, False):
        heads = attention_work(doc, causal, heads=8, cp=4, split="heads")
        assert len(set(heads)) == 1 and heads[0] > 0
        contiguous = attention_work(doc, causal, heads=8, cp=4, split="contiguous")
        assert sum(contiguous) == sum(heads)  # the same total work, divided otherwise
        if causal:
            assert max(contiguous) > 2 * min(contiguous), contiguous


def test_sampling_prompts_are_refused_with_cp():
    """(--eval-tasks runs under CP: tests/pretrain/test_downstream.py.)"""
    from argparse import Namespace

    from pretrain.main import check_context_parallel_options

    check_context_parallel_options(Namespace(cp=1, sample_prompt="hi"))
    check_context_parallel_options(Namespace(cp=2, sample_prompt=None))
    with pytest.raises(LayoutError, match="--sample-prompt cannot run with --cp 2.*drop"):
        check_context_parallel_options(Namespace(cp=2, sample_prompt="hi"))


def test_context_parallel_layouts_are_validated_naming_the_fix():
    cfg = preset("tiny")  # 4 heads, 2 key/value groups, seq 64
    assert validate_layout(cfg, 8, tp=2, cp=2, zero_stage=3, micro_batch_size=2).dp == 2
    with pytest.raises(LayoutError, match="TP x PP x CP x DP"):
        validate_layout(cfg, 6, cp=4)
    with pytest.raises(LayoutError, match="choose --cp dividing 2"):
        validate_layout(cfg, 8, tp=2, cp=4)
    with pytest.raises(LayoutError, match="sequence length 64 must split into 3 equal chunks"):
        validate_layout(cfg.replace(hidden_size=96, num_attention_heads=6, num_query_groups=6), 3, cp=3)
    with pytest.raises(LayoutError, match="same masks; set --hidden-dropout 0 --attention-dropout 0"):
        validate_layout(cfg.replace(hidden_dropout=0.1), 2, cp=2)
    with pytest.raises(LayoutError, match="--cp 2 with --compile"):
        validate_layout(cfg, 2, cp=2, compile_layers=True)
    with pytest.raises(LayoutError, match="num_attention_heads=4 is not divisible by --tp 3"):  # TP's error first
        validate_layout(cfg, 6, tp=3, cp=2)
