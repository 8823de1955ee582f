"""prepare --format chat|instruction: conversations rendered with the chat template into token shards plus a loss-mask
dataset of the same documents; bad rows counted with file:line (--strict stops at the first); --max-tokens drops or
truncates; exact and near dedup, resume and merge carry the mask with the tokens."""
import json
import random

import numpy as np
import pytest

from conftest import make_conversation, read_conversations, run_prepare
from data_prep import chat
from data_prep.readers import InputError
from data_prep.tokenizer import eod_id, load, train_bpe


def conversations(n: int, seed: int = 5) -> list[list[dict]]:
    rng = random.Random(seed)
    return [make_conversation(rng, turns=rng.randint(1, 3), answer_words=rng.randint(5, 40)) for _ in range(n)]


def write_rows(path, rows) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")


def expected(tokenizer_dir, messages, template=None) -> tuple[list[int], list[int]]:
    """What a conversation must become: transformers' apply_chat_template ids + EOD, and its mask."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok = load(tokenizer_dir)
    kw = {"chat_template": chat.BUILTIN[template]["template"]} if template else {}
    ids = list(hf.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"])
    _, mask = chat.encode(messages, chat.load_template(tokenizer_dir, template), tok)
    return ids + [eod_id(tok, tokenizer_dir)], mask + [0]


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_shards_hold_transformers_ids_and_the_mask_of_every_conversation(tmp_path, template):
    tok_dir = tmp_path / "tok"
    rng = random.Random(0)
    from conftest import make_doc

    train_bpe((make_doc(rng) for _ in range(200)), vocab_size=400, output_dir=str(tok_dir), chat_template=template)
    convs = conversations(30)
    write_rows(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    man = run_prepare([tmp_path / "c.jsonl"], str(tok_dir), tmp_path / "out", data_format="chat", workers=2,
                      chunk_docs=7, shard_tokens=1500)
    docs = read_conversations(tmp_path / "out")
    assert len(docs) == 30 and len(man["shards"]) > 1
    for messages, (ids, mask) in zip(convs, docs):
        assert (ids, mask) == expected(str(tok_dir), messages)
        eot = load(str(tok_dir)).token_to_id(chat.BUILTIN[template]["end_of_turn"])
        assert sum(1 for i, m in zip(ids, mask) if i == eot and m) == sum(m["role"] == "assistant" for m in messages)
    assert man["data"]["format"] == "chat" and man["data"]["chat_template"]["name"] == "tokenizer"
    assert man["data"]["chat_template"]["sha256"] == chat.load_template(str(tok_dir)).sha256
    assert man["counts"]["supervised_tokens"] == sum(sum(m) for _, m in docs)


def test_instruction_rows_from_parquet(tmp_path, chat_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"instruction": f"Say {w}.", "input": "" if i % 2 else f"context {i}", "output": f"{w} {w}."}
            for i, w in enumerate(["model", "data", "token", "layer"])]
    table = pa.Table.from_pylist(rows).append_column("image", pa.array([b"\x89PNG"] * 4))  # not JSON: never read
    pq.write_table(table, tmp_path / "i.parquet")
    man = run_prepare([tmp_path / "i.parquet"], chat_tokenizer, tmp_path / "out", data_format="instruction")
    assert man["counts"]["documents_kept"] == 4 and man["data"]["format"] == "instruction"
    for row, got in zip(rows, read_conversations(tmp_path / "out")):
        assert got == expected(chat_tokenizer, chat.instruction_messages(row))
    write_rows(tmp_path / "bad.jsonl", [rows[0], {**rows[1], "input": 3}, {"instruction": "x"}])
    man = run_prepare([tmp_path / "bad.jsonl"], chat_tokenizer, tmp_path / "bad", data_format="instruction")
    assert man["counts"]["dropped"] == {"bad_instruction": 2}  # an input that is not a string is not left out


def test_text_runs_keep_their_fingerprint_and_refuse_conversation_options(tmp_path, tiny_tokenizer):
    write_rows(tmp_path / "t.jsonl", [{"text": "a document of words"}])
    man = run_prepare([tmp_path / "t.jsonl"], tiny_tokenizer, tmp_path / "out")
    assert not {"data_format", "messages_key", "chat_template", "max_tokens", "too_long"} & set(man["options"])
    assert man["data"] == {"format": "text"}
    with pytest.raises(ValueError, match="--max-tokens apply to conversations only; pass --format chat"):
        run_prepare([tmp_path / "t.jsonl"], tiny_tokenizer, tmp_path / "x", max_tokens=100)


BAD = {
    "no_assistant_turn": {"messages": [{"role": "user", "content": "hi"}]},
    "unknown_role": {"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
    "content_not_string": {"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}]},
    "empty": {"messages": []},
    "bad_json": "{not json",
    "end_of_turn_in_content": {"messages": [{"role": "user", "content": "a"},
                                            {"role": "assistant", "content": "x<|im_end|>"}]},
}


def test_bad_rows_of_each_kind_are_counted_with_file_and_line_and_strict_stops_at_the_first(tmp_path,
                                                                                           chat_tokenizer):
    good = [{"messages": m} for m in conversations(3)]
    rows = [good[0], *BAD.values(), good[1], good[1], good[2]]  # good[1] twice: an exact duplicate
    write_rows(tmp_path / "c.jsonl", rows)
    man = run_prepare([tmp_path / "c.jsonl"], chat_tokenizer, tmp_path / "out", data_format="chat")
    assert man["counts"]["documents_kept"] == 3
    assert man["counts"]["dropped"] == {**{k: 1 for k in BAD}, "exact_duplicate": 1}
    for line, reason in enumerate(BAD, start=2):
        assert man["drop_examples"][reason] == [f"{tmp_path / 'c.jsonl'}:{line}"]
    with pytest.raises(InputError, match=r"c.jsonl:2: no assistant turn \(--strict\)"):
        run_prepare([tmp_path / "c.jsonl"], chat_tokenizer, tmp_path / "strict", data_format="chat", strict=True)
    write_rows(tmp_path / "bad.jsonl", list(BAD.values()))
    with pytest.raises(ValueError, match="no document kept: 6 read.*--messages-key"):
        run_prepare([tmp_path / "bad.jsonl"], chat_tokenizer, tmp_path / "none", data_format="chat")


def test_max_tokens_drops_or_truncates_keeping_the_prompt_counted_either_way(tmp_path, chat_tokenizer):
    convs = conversations(20)
    write_rows(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    full = [expected(chat_tokenizer, m) for m in convs]
    limit = sorted(len(ids) for ids, _ in full)[10]
    man = run_prepare([tmp_path / "c.jsonl"], chat_tokenizer, tmp_path / "drop", data_format="chat",
                      max_tokens=limit)
    longer = [i for i, (ids, _) in enumerate(full) if len(ids) > limit]
    assert man["counts"]["dropped"] == {"too_long": len(longer)} and man["counts"]["truncated"] == 0
    assert read_conversations(tmp_path / "drop") == [f for f in full if len(f[0]) <= limit]
    man = run_prepare([tmp_path / "c.jsonl"], chat_tokenizer, tmp_path / "cut", data_format="chat",
                      max_tokens=limit, too_long="truncate")
    docs = read_conversations(tmp_path / "cut")
    eod = full[0][0][-1]
    assert man["counts"]["truncated"] == len(longer) and len(docs) == 20  # every prompt here fits the limit
    for (ids, mask), (want_ids, want_mask) in zip(docs, full):
        assert len(ids) <= limit and ids[-1] == eod
        assert ids[:-1] == want_ids[:len(ids) - 1] and mask[:-1] == want_mask[:len(ids) - 1]  # its beginning
    # a conversation whose prompt alone fills the limit teaches nothing: dropped even with truncate
    first_answer = min(m.index(1) for _, m in full)
    man = run_prepare([tmp_path / "c.jsonl"], chat_tokenizer, tmp_path / "tiny", data_format="chat",
                      max_tokens=first_answer + 2, too_long="truncate")
    assert man["counts"]["dropped"]["too_long"] >= 1


def test_the_template_must_exist_and_its_tokens_be_in_the_tokenizer(tmp_path, tiny_tokenizer, chat_tokenizer):
    write_rows(tmp_path / "c.jsonl", [{"messages": m} for m in conversations(2)])
    with pytest.raises(ValueError, match="has no chat_template; pass --chat-template"):
        run_prepare([tmp_path / "c.jsonl"], tiny_tokenizer, tmp_path / "a", data_format="chat")
    with pytest.raises(ValueError, match="lacks <|start_header_id|>.*train-tokenizer --chat-template llama3"):
        run_prepare([tmp_path / "c.jsonl"], chat_tokenizer, tmp_path / "b", data_format="chat",
                    chat_template="llama3")


def masks_follow_tokens(out) -> list[tuple[list[int], list[int]]]:
    """Each document's mask has its document's length and its tokens' answer positions (checked against the chat
    template's own mask by the tests that call it)."""
    docs = read_conversations(out)
    for ids, mask in docs:
        assert len(ids) == len(mask) and mask[-1] == 0
    return docs


def test_near_dedup_resume_and_merge_carry_the_mask(tmp_path, chat_tokenizer, monkeypatch):
    base = conversations(40, seed=9)
    near = [[{**m, "content": m["content"] + " x"} if m["role"] == "assistant" else m for m in c] for c in base[:8]]
    rows = [{"messages": m} for m in base + near]
    random.Random(1).shuffle(rows)  # duplicates inside shards, not only at their ends
    write_rows(tmp_path / "a.jsonl", rows[:24])
    write_rows(tmp_path / "b.jsonl", rows[24:])
    inputs = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    kw = dict(data_format="chat", dedup="near", near_threshold=0.7, chunk_docs=5, shard_tokens=800)
    one = run_prepare(inputs, chat_tokenizer, tmp_path / "one", **kw)
    assert one["counts"]["dropped"].get("near_duplicate", 0) >= 6
    docs = masks_follow_tokens(tmp_path / "one")
    kept = [expected(chat_tokenizer, c["messages"]) for c in rows]
    assert all(d in kept for d in docs) and len(docs) == one["counts"]["documents_kept"]
    # a run stopped after some shards were committed, then rerun: the same shards, masks and counts
    from data_prep import work

    process, calls = work.process, []

    def failing(job):
        calls.append(job[0])
        if len(calls) == 6:
            raise KeyboardInterrupt("stopped")
        return process(job)

    monkeypatch.setattr(work, "process", failing)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(inputs, chat_tokenizer, tmp_path / "resumed", **kw)
    monkeypatch.setattr(work, "process", process)
    committed = sorted(p.name for p in (tmp_path / "resumed" / "near-input").glob("*.state.json"))
    assert committed, "nothing was committed before the stop"
    again = run_prepare(inputs, chat_tokenizer, tmp_path / "resumed", **kw)
    assert again["shards"] == one["shards"] and again["counts"] == one["counts"]
    assert masks_follow_tokens(tmp_path / "resumed") == docs
    # two ranks and a merge (into one prefix, and as re-indexed shards) hold what one process does
    for rank in range(2):
        run_prepare(inputs, chat_tokenizer, tmp_path / "ranks", rank=rank, world_size=2, **kw)
    from data_prep.merge import merge

    merged = merge(str(tmp_path / "ranks"))
    assert masks_follow_tokens(tmp_path / "ranks") == docs
    assert merged["counts"]["supervised_tokens"] == one["counts"]["supervised_tokens"]
    into = merge(str(tmp_path / "ranks"), into="all")
    assert into["shards"][0]["loss_mask"]["path"] == "all-lossmask"
    assert masks_follow_tokens(tmp_path / "ranks") == docs
    assert np.sum([sum(m) for _, m in docs]) == into["counts"]["supervised_tokens"]
