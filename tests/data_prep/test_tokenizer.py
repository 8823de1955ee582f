"""data_prep.tokenizer and data_prep.indexed: training sees prepare's normalisation; token dtypes."""
import random

import numpy as np
import pytest

from conftest import make_doc


def test_train_tokenizer_cli_sees_the_same_normalisation(tmp_path):
    """train-tokenizer --keep-indent learns indentation merges; without it, it never sees runs of spaces."""
    from data_prep.cli import main
    from data_prep.tokenizer import load

    rng = random.Random(3)
    (tmp_path / "src").mkdir()
    for i in range(40):
        body = "\n".join(f"{' ' * 4 * rng.randint(1, 3)}x{j} = y{j}" for j in range(30))
        (tmp_path / "src" / f"m{i}.py").write_text(f"def f{i}():\n{body}\n")
    for flags, name in (([], "plain"), (["--keep-indent"], "indent")):
        assert main(["train-tokenizer", "--input", str(tmp_path / "src"), "--text-suffix", ".py", "--vocab-size",
                     "300", "--output", str(tmp_path / name), *flags]) == 0
    line = "\n            x1 = y1"
    plain, indent = (len(load(str(tmp_path / n)).encode(line, add_special_tokens=False).ids)
                     for n in ("plain", "indent"))
    assert indent < plain - 4, (indent, plain)


def test_uint16_for_small_vocab_int32_for_large():
    from data_prep.indexed import token_dtype

    assert token_dtype(32000) == np.uint16 and token_dtype(128256) == np.int32


ODD_TEXTS = [
    "plain English text, with punctuation; and numbers 12345.",
    "added special tokens inside text: <|endoftext|> and <|pad|> and </s> <s>",
    "a NUL \x00 byte, a tab\there, a bell \x07 and U+FFFD \ufffd",
    "emoji \U0001f600\U0001f680 and flags \U0001f1eb\U0001f1f7 and a ZWJ family \U0001f468\u200d\U0001f469\u200d"
    "\U0001f467",
    "CJK: \u4eca\u65e5\u306f\u4e16\u754c \ud55c\uad6d\uc5b4 \u4e2d\u6587\u5b57\u7b26",
    "a very long word " + "x" * 5000 + " and " + "\u00e9" * 3000,
    "lone surrogate repaired by the reader: \ufffd, combining e\u0301, RTL \u05e9\u05dc\u05d5\u05dd",
    "  leading and trailing spaces  \n\n\n\nand blank lines\r\nand CRLF\n",
    "",
]


def _sentencepiece_style(tmp_path):
    """A Llama 2 / Mistral-like tokenizer.json: BPE with byte fallback, "\u2581" for spaces, one prepended."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=special, show_progress=False)
    rng = random.Random(0)
    tok.train_from_iterator((make_doc(rng) for _ in range(300)), trainer=trainer)
    path = tmp_path / "sp" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return str(path.parent)


@pytest.mark.parametrize("kind", ["byte-level BPE", "SentencePiece-style BPE"])
def test_gigatoken_gives_the_tokenizers_ids_on_odd_text(tiny_tokenizer, tmp_path, kind):
    from data_prep.tokenizer import Encoder

    path = tiny_tokenizer if kind == "byte-level BPE" else _sentencepiece_style(tmp_path)
    enc = Encoder(path, "auto")
    assert enc.backend == "gigatoken"  # really the fast path
    texts = ODD_TEXTS + [make_doc(random.Random(i)) for i in range(50)]
    assert enc.check(texts) is None
    flat, lengths = enc.encode(texts)
    hf = Encoder(path, "tokenizers").encode(texts)
    assert np.array_equal(flat, hf[0]) and np.array_equal(lengths, hf[1])


def test_the_check_can_fail(tiny_tokenizer, tmp_path):
    """Checked, not assumed: an encoder whose reference differs is caught, naming where."""
    from data_prep.tokenizer import Encoder, load

    enc = Encoder(tiny_tokenizer, "auto")
    enc._hf = load(_sentencepiece_style(tmp_path))
    problem = enc.check(["some text that both encode differently"])
    assert problem and problem.startswith("text 0") and "from gigatoken" in problem


def test_prepare_output_is_byte_identical_with_either_backend(tiny_tokenizer, tmp_path):
    """The shards (and so their equality with Megatron's own preprocess_data) do not depend on the backend."""
    from conftest import run_prepare, write_jsonl

    texts = ODD_TEXTS[:-1] + [make_doc(random.Random(i)) for i in range(200)]
    write_jsonl(tmp_path / "a.jsonl", texts)
    (tmp_path / "b.jsonl").write_text('{"text": "x\\ud800y lone surrogate"}\n')
    runs = {}
    for backend in ("gigatoken", "tokenizers"):
        man = run_prepare([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], tiny_tokenizer, tmp_path / backend,
                          tokenizer_backend=backend, verify_every=1, chunk_docs=32)
        assert man["tokenizer"]["backend"] == backend
        runs[backend] = {p.name: p.read_bytes() for p in (tmp_path / backend).glob("shard-*") if
                         p.suffix in (".bin", ".idx")}
    assert runs["gigatoken"] == runs["tokenizers"] and len(runs["gigatoken"]) >= 2
