"""Conversations -> token ids and a loss mask for fine-tuning (issue 30): rendered with a chat template exactly as
transformers' `apply_chat_template(messages, tokenize=True)` renders and tokenizes them (ids identical: the same
jinja renderer, transformers.utils.chat_template_utils.render_jinja_template, with the tokenizer's special tokens
as its variables, and the rendered text tokenized without added special tokens), and a mask that is 1 on every
assistant turn's tokens and its end-of-turn token, 0 elsewhere (system and user turns, role headers, what follows
the end-of-turn).

Why not transformers' own `return_assistant_tokens_mask`: it needs `{% generation %}` markers, which the templates
tokenizers ship rarely have. The assistant spans come instead from the template itself: the text of the first i
messages plus the generation prompt is where turn i's answer starts, and its end-of-turn token (the template's, e.g.
ChatML's <|im_end|>, Llama 3's <|eot_id|>, which is not its end-of-text) ends it. A template whose rendering of a
conversation's first messages is not a prefix of the whole conversation's (some strip earlier reasoning) is refused,
naming it. A token is masked when it overlaps a span, transformers' rule for its generation masks.

Built-in templates for tokenizers that have none (`--chat-template chatml|llama3`) carry the special tokens they need;
`train-tokenizer --chat-template` adds them to a new tokenizer and writes the template into its config.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")

# ChatML as Qwen2 writes it (without its default system prompt); Llama 3's, whose end-of-turn <|eot_id|> is not its
# end-of-text <|end_of_text|>, and which trims each content as Llama 3's own template does.
BUILTIN = {
    "chatml": {
        "template": ("{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                     "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                     "{{ '<|im_start|>assistant\\n' }}{%- endif %}"),
        "special_tokens": ["<|im_start|>", "<|im_end|>"],
        "end_of_turn": "<|im_end|>",
    },
    "llama3": {
        # its begin-of-text written as a literal, not bos_token: the tokenizer's bos stays the end-of-text token
        # pretraining saw (lm-eval's prefix token, the export's bos_token_id)
        "template": ("{{- '<|begin_of_text|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + "
                     "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
                     "{%- endfor %}"
                     "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
                     "{%- endif %}"),
        "special_tokens": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "end_of_turn": "<|eot_id|>",
    },
}
_END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>")


class BadConversation(ValueError):
    """A row that cannot be rendered: `reason` is what prepare counts it as (a drop reason of the manifest), the
    message says what is wrong with it."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ChatTemplate:
    source: str  # jinja
    end_of_turn: str
    variables: dict  # bos_token, eos_token, ...: what apply_chat_template passes (the tokenizer's special tokens)
    name: str  # "chatml", "llama3", a path, or "tokenizer"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text; what it refuses (raise_exception, a first message it does not expect) is a
        BadConversation: one row's problem, counted, not the run's."""
        from jinja2 import TemplateError
        from transformers.utils.chat_template_utils import render_jinja_template

        try:
            rendered, _ = render_jinja_template(conversations=[messages], chat_template=self.source,
                                                add_generation_prompt=add_generation_prompt, **self.variables)
        except TemplateError as e:
            raise BadConversation("template_refused", f"the chat template {self.name} refused it: {e}") from None
        return rendered[0]


def load_template(tokenizer_dir: str, choice: str | None = None) -> ChatTemplate:
    """The tokenizer's own template (tokenizer_config.json chat_template), or `choice`: a built-in name or a .jinja
    path (for a tokenizer without one). Its special tokens must be tokens of the tokenizer."""
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    # the special tokens apply_chat_template passes (an AddedToken is saved as a dict with its "content")
    variables = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items()
                 if k.endswith("_token") and isinstance(v, (str, dict))}
    if choice in BUILTIN:
        b = BUILTIN[choice]
        return ChatTemplate(b["template"], b["end_of_turn"], {**variables, **{k: v for k, v in b.items()
                                                                               if k.endswith("_token")}}, choice)
    if choice:
        if not os.path.isfile(choice):
            raise FileNotFoundError(f"--chat-template {choice}: neither {', '.join(BUILTIN)} nor a .jinja file")
        source, name = open(choice).read(), choice
    elif isinstance(config.get("chat_template"), str):
        source, name = config["chat_template"], "tokenizer"
    else:
        raise ValueError(f"{config_path}: the tokenizer has no chat_template; pass --chat-template "
                         f"{'|'.join(BUILTIN)}|PATH.jinja (train-tokenizer --chat-template adds its tokens)")
    eot = next((t for t in _END_OF_TURN_CANDIDATES if t in source), None)
    if eot is None:
        raise ValueError(f"chat template {name}: no end-of-turn token found (looked for "
                         f"{', '.join(_END_OF_TURN_CANDIDATES)}); the loss mask needs one")
    return ChatTemplate(source, eot, variables, name)


def check_tokens(template: ChatTemplate, tokenizer) -> None:
    """Every special token the template writes must be one token of the tokenizer, or the ids would be text."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    needed = BUILTIN[template.name]["special_tokens"] if template.name in BUILTIN else [template.end_of_turn]
    missing = [t for t in needed if t not in vocab]
    if missing:
        raise ValueError(f"chat template {template.name}: the tokenizer lacks {', '.join(missing)}; train one with "
                         f"`python -m data_prep train-tokenizer --chat-template {template.name}` (or add them and "
                         f"resize the embedding)")


def validate(messages) -> list[dict]:
    """The messages as the template gets them; BadConversation names what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise BadConversation("empty", "empty: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise BadConversation("unknown_role", f"unknown role in message {i}: {role!r}")
        if not isinstance(m.get("content"), str):
            raise BadConversation("content_not_string",
                                  f"content not a string in message {i} ({type(m.get('content')).__name__})")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadConversation("no_assistant_turn", "no assistant turn")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def encode(messages: list[dict], template: ChatTemplate, tokenizer) -> tuple[list[int], list[int]]:
    """-> (ids, loss mask) of one validated conversation."""
    _, ids, mask = render_and_encode(messages, template, tokenizer)
    return ids, mask


def render_and_encode(messages: list[dict], template: ChatTemplate, tokenizer) -> tuple[str, list[int], list[int]]:
    """-> (the rendered text, what exact dedup hashes; its ids; their loss mask) of one validated conversation."""
    text = template.render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if template.end_of_turn in m["content"]:
            raise BadConversation("end_of_turn_in_content",
                                  f"message {i} contains the end-of-turn token {template.end_of_turn} as text")
        prompt, through = template.render(messages[:i], add_generation_prompt=True), template.render(messages[:i + 1])
        if not (text.startswith(through) and through.startswith(prompt)):
            raise ValueError(f"chat template {template.name}: rendering the first {i + 1} messages is not a prefix "
                             f"of the whole conversation's, so answers cannot be located; use a template without "
                             f"history rewriting (--chat-template)")
        end = text.find(template.end_of_turn, len(prompt))
        if end < 0:
            raise ValueError(f"chat template {template.name}: assistant turn {i} has no {template.end_of_turn}")
        spans.append((len(prompt), end + len(template.end_of_turn)))
    enc = tokenizer.encode(text, add_special_tokens=False)
    mask = [int(any(s < e_span and e > s_span for s_span, e_span in spans)) for s, e in enc.offsets]
    return text, enc.ids, mask


def fit_length(ids: list[int], mask: list[int], max_tokens: int, too_long: str) -> tuple[list[int], list[int], bool]:
    """A conversation of at most `max_tokens` ids (its end-of-document id, which prepare appends, included) ->
    (ids, mask, truncated). Longer: --too-long drop refuses it; truncate cuts its end and keeps it when some answer
    token survives (a conversation whose prompt alone fills max_tokens teaches nothing: dropped either way)."""
    if len(ids) + 1 <= max_tokens:
        return ids, mask, False
    if too_long == "truncate" and any(mask[:max_tokens - 1]):
        return ids[:max_tokens - 1], mask[:max_tokens - 1], True
    raise BadConversation("too_long", f"{len(ids) + 1} tokens, over --max-tokens {max_tokens}"
                          + ("" if too_long == "drop" else " and no answer token within them"))


def instruction_messages(row: dict) -> list[dict]:
    """{instruction, input?, output} -> a user turn (instruction, then the input after a blank line) and an
    assistant turn."""
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise BadConversation("bad_instruction", f"{key} missing or not a string")
    if row.get("input") is not None and not isinstance(row["input"], str):
        raise BadConversation("bad_instruction", f"input not a string ({type(row['input']).__name__})")
    prompt = row["instruction"] + (f"\n\n{row['input']}" if isinstance(row.get("input"), str) and row["input"]
                                   else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
