"""data_prep.tokenizer and data_prep.indexed: training sees prepare's normalisation; token dtypes."""
import random

import numpy as np


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
