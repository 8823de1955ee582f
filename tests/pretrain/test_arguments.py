"""pretrain/main.py's command line: a YAML/JSON run config with flag overrides, and clear refusals."""
import json

import pytest

from pretrain.arguments import parse_args
from pretrain.schedule import lr_at


def test_yaml_config_with_command_line_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: 125m\nlr: 0.001\ntrain-iters: 50\ndata_path: [0.7, dirA, 0.3, dirB]\ntp: 2\n")
    a = parse_args(["--config", str(cfg), "--lr", "0.002"])
    assert (a.model, a.lr, a.train_iters, a.tp) == ("125m", 0.002, 50, 2)
    assert a.data_path == [0.7, "dirA", 0.3, "dirB"]
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"model": "tiny", "train_iters": 3, "data_path": ["d"]}))
    assert parse_args(["--config", str(j)]).model == "tiny"


def test_unknown_config_keys_and_missing_options_are_refused(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("modle: 1b\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(cfg), "--train-iters", "1", "--data-path", "d"])
    assert "unknown option(s) modle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--data-path", "d"])
    assert "--train-iters or --train-tokens" in capsys.readouterr().err


@pytest.mark.parametrize("style", ["cosine", "linear", "wsd"])
def test_lr_schedules_warm_up_then_decay_to_min(style):
    lrs = [lr_at(i, 1.0, 0.1, 10, 100, style) for i in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b - 1e-12 for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[99] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lr_at(50, 1.0, 0.1, 10, 100, "constant") == 1.0
