"""data_prep.clean: normalisation (fast paths equal the plain definition), every filter with its reason."""
import json
import random

import pytest

from conftest import make_doc, read_back, run_prepare, write_jsonl
from data_prep.clean import FilterConfig, normalize


# ----------------------------------------------------------------------------------------------- cleaning
def test_normalize_nfc_control_chars_whitespace():
    assert normalize("Cafe\u0301\x00 \x07  bar\t\tbaz  \n\n\n\nend\r\n") == "Caf\u00e9 bar baz\n\nend"
    # the ASCII fast path and the Unicode path agree
    ascii_only, unicode = "  a\x01 \x7f b \n\n\n\n\n\nc\x0b", "  a\x01 \x7f b \n\n\n\n\n\nc\x0b\u00e9"
    assert normalize(ascii_only) == normalize(unicode)[:-1] == "a b\n\nc"
    assert normalize("x\u00a0\u3000y\x85 ") == "x y"


def test_collapse_spaces_fast_path_equals_split_join():
    """The str.strip fast path must give exactly what per-line split/join gives, and it may only be taken when
    _OTHER_SPACE knows every whitespace character that survives control-character removal."""
    import random
    import sys

    from data_prep.clean import _CONTROL, _OTHER_SPACE, _collapse_spaces, _collapse_spaces_keep_indent

    others = {chr(c) for c in range(sys.maxunicode + 1)
              if chr(c).isspace() and chr(c) not in " \t\n\r" and not _CONTROL.match(chr(c))}
    assert others and all(_OTHER_SPACE.match(c) for c in others)
    rng = random.Random(0)
    for alphabet in (" \t\nab", " \t\nab\u00e9", " \t\nab\u00a0\u2028\u3000\u2009"):
        for _ in range(5000):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
            assert _collapse_spaces(s) == "\n".join(" ".join(line.split()) for line in s.split("\n")), repr(s)
            indented = "\n".join(line[:len(line) - len(line.lstrip())] + " ".join(line.split()) if line.strip()
                                 else "" for line in s.split("\n"))
            assert _collapse_spaces_keep_indent(s) == indented, repr(s)


def test_keep_indent_keeps_code_indentation_end_to_end(tmp_path, tokenizer_dir):
    from data_prep.cli import main

    src = "\n\ndef f(x):\n    if x:   # note \n\treturn  x\t\n\n\n\n   \nclass A:\r\n        pass\u00a0\u00a0y\n"
    assert normalize(src) == "def f(x):\nif x: # note\nreturn x\n\nclass A:\npass y"
    kept = normalize(src, keep_indent=True)
    assert kept == "def f(x):\n    if x: # note\n\treturn x\n\nclass A:\n        pass y"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.py").write_text(src)
    assert main(["prepare", "--input", str(tmp_path / "src"), "--text-suffix", ".py", "--keep-indent",
                 "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "out"), "--progress", "log"]) == 0
    from data_prep.tokenizer import eod_id, load

    tok = load(tokenizer_dir)
    assert read_back(tmp_path / "out") == [tok.encode(kept, add_special_tokens=False).ids
                                           + [eod_id(tok, tokenizer_dir)]]
    man = json.load(open(tmp_path / "out" / "manifest.json"))
    assert man["options"]["filters"]["keep_indent"] is True


@pytest.mark.parametrize("text, cfg, reason", [
    ("", FilterConfig(), "empty"),
    ("short", FilterConfig(min_chars=10), "too_short"),
    ("x" * 101, FilterConfig(max_chars=100), "too_long"),
    ("a b c", FilterConfig(min_words=5), "too_few_words"),
    ("1 2 3 4 5 six", FilterConfig(min_alpha_word_fraction=0.8), "low_alpha_words"),
    ("a b c d e", FilterConfig(min_mean_word_length=3), "mean_word_length"),
    ("supercalifragilistic words", FilterConfig(max_mean_word_length=10), "mean_word_length"),
    ("# # # hello world", FilterConfig(max_symbol_ratio=0.1), "symbol_ratio"),
    ("same\nsame\nsame\nother", FilterConfig(max_duplicate_line_fraction=0.3), "repeated_lines"),
])
def test_each_filter_drops_with_its_reason(text, cfg, reason):
    from data_prep.clean import clean

    assert clean(text, cfg) == (None, reason)
    off = FilterConfig(min_chars=None, max_chars=None)
    if reason != "empty":
        assert clean(text, off)[1] is None  # every filter can be switched off


def test_gopher_preset_keeps_prose_drops_junk(tmp_path, tokenizer_dir):
    rng = random.Random(3)
    good = [make_doc(rng, 80) for _ in range(5)]
    junk = ["### ### ### ... " * 30, "12 34 56 78 " * 30]
    write_jsonl(tmp_path / "a.jsonl", good + junk)
    man = run_prepare([tmp_path / "a.jsonl"], tokenizer_dir, tmp_path / "out", filters=FilterConfig.gopher())
    assert man["counts"]["documents_kept"] == 5
    assert sum(man["counts"]["dropped"].values()) == 2
