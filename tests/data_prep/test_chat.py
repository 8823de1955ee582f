"""data_prep/chat.py: conversations rendered and tokenized exactly as transformers' apply_chat_template does, and
a loss mask equal, token by token, to the one transformers computes from the same template with `{% generation %}`
markers around each answer and its end-of-turn token (an independent oracle: its own span tracking)."""
import random

import pytest

from conftest import make_doc
from data_prep import chat
from data_prep.tokenizer import load, train_bpe

# Each template again, with transformers' generation markers around what the mask must cover.
MARKED = {
    "chatml": ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
               "{%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
               "{% endgeneration %}{%- else %}{{ message['content'] + '<|im_end|>' }}{%- endif %}{{ '\\n' }}"
               "{%- endfor %}"),
    "llama3": ("{{- '<|begin_of_text|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
               "'<|end_header_id|>\\n\\n' }}{%- if message['role'] == 'assistant' %}{% generation %}"
               "{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{%- else %}"
               "{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}{%- endfor %}"),
}
CONVERSATIONS = [
    [{"role": "user", "content": "What is a shard?"}, {"role": "assistant", "content": "A piece of the corpus."}],
    [{"role": "system", "content": "Be brief.\n"}, {"role": "user", "content": "  two spaces, then a tab\t"},
     {"role": "assistant", "content": " Leading space and\n\nnewlines "}, {"role": "user", "content": "More?"},
     {"role": "assistant", "content": "Unicode: naïve café — done."}],
]


@pytest.fixture(scope="module", params=sorted(chat.BUILTIN))
def tokenizer_dir(request, tmp_path_factory):
    rng = random.Random(3)
    out = tmp_path_factory.mktemp(f"tok-{request.param}")
    train_bpe((make_doc(rng) for _ in range(200)), vocab_size=400, output_dir=str(out), chat_template=request.param)
    return request.param, str(out)


def test_ids_and_mask_equal_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    name, path = tokenizer_dir
    hf, tok = AutoTokenizer.from_pretrained(path), load(path)
    template = chat.load_template(path)  # the one train-tokenizer wrote into tokenizer_config.json
    assert template.name == "tokenizer" and template.end_of_turn == chat.BUILTIN[name]["end_of_turn"]
    chat.check_tokens(chat.load_template(path, name), tok)
    rows = CONVERSATIONS + [chat.instruction_messages({"instruction": "Name it.", "input": "x = 1", "output": "x"})]
    for messages in rows:
        ids, mask = chat.encode(chat.validate(messages), template, tok)
        want = hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert ids == list(want)
        oracle = hf.apply_chat_template(messages, chat_template=MARKED[name], tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
        assert list(oracle["input_ids"]) == ids  # the marked template renders the same text
        assert mask == list(oracle["assistant_masks"]), [(hf.decode([i]), m) for i, m in zip(ids, mask)]
        eot = tok.token_to_id(template.end_of_turn)
        answers = sum(m["role"] == "assistant" for m in messages)
        assert sum(1 for i, m in zip(ids, mask) if i == eot and m) == answers  # each answer's end-of-turn, no other


@pytest.mark.parametrize("messages, why", [
    ([], "empty"), ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "unknown role"),
    ([{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "x"}], "content not a string"),
])
def test_bad_conversations_say_why(messages, why):
    with pytest.raises(chat.BadConversation, match=why):
        chat.validate(messages)


def test_a_tokenizer_without_the_templates_tokens_is_refused_naming_the_fix(tiny_tokenizer):
    with pytest.raises(ValueError, match="lacks <|im_start|>.*train-tokenizer --chat-template chatml"):
        chat.check_tokens(chat.load_template(tiny_tokenizer, "chatml"), load(tiny_tokenizer))
    with pytest.raises(ValueError, match="has no chat_template; pass --chat-template"):
        chat.load_template(tiny_tokenizer)


def test_what_a_template_refuses_is_one_bad_row(tokenizer_dir, tmp_path):
    name, path = tokenizer_dir
    jinja = tmp_path / "strict.jinja"
    jinja.write_text("{%- if messages[0]['role'] != 'user' %}{{ raise_exception('begin with a user turn') }}"
                     "{%- endif %}" + chat.BUILTIN["chatml"]["template"])
    template = chat.load_template(path, str(jinja))
    messages = [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]
    with pytest.raises(chat.BadConversation, match="refused it: begin with a user turn"):
        chat.encode(chat.validate(messages), template, load(path))
