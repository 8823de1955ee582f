"""pretrain.checkpoint: nothing lost, nothing silent, nothing executed.

`latest` only ever names a complete checkpoint, and a missing `latest` resumes the newest complete one instead of
starting over; a damaged tag (overwritten, truncated, garbage meta.json) is reported by file, set aside, and the
previous tag resumes; a planted pickle is never executed; a full disk fails the save with its path and removes
the partial tag; keep-last pruning.
"""
import json
import os
import pickle
import shutil

import pytest

from conftest import MAIN, WORKERS, common, full_disk_run, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """ZeRO-3, DP=2, fp32: checkpoints after steps 2 and 4, losses of steps 1-6."""
    d = tmp_path_factory.mktemp("saved")
    launch(2, WORKERS / "train_layout.py", "--zero", "3", "--steps", "6", "--save", d / "ck", "--save-at", "2", "4",
           "--out", d / "report.json")
    return d


def resume(saved_dir, tmp_path, prepare=None, check=True):
    """Copy the checkpoints, let `prepare(ck)` damage them, resume to step 6; -> (stdout, losses, ck)."""
    ck = tmp_path / "ck"
    shutil.copytree(saved_dir / "ck", ck)
    if prepare:
        prepare(ck)
    proc = launch(2, WORKERS / "train_layout.py", "--zero", "3", "--steps", "6", "--load", ck, "--out",
                  tmp_path / "r.json", check=check)
    losses = json.loads((tmp_path / "r.json").read_text())["losses"] if proc.returncode == 0 else None
    return proc.stdout + proc.stderr, losses, ck


def reference(saved_dir, steps):
    want = json.loads((saved_dir / "report.json").read_text())["losses"]
    return {str(s): want[str(s)] for s in steps}


def test_missing_latest_resumes_the_newest_complete_checkpoint(saved, tmp_path):
    out, losses, _ = resume(saved, tmp_path, lambda ck: (ck / "latest").unlink())
    assert "no 'latest' file; resuming from the newest complete checkpoint iter_0000004" in out
    assert losses == reference(saved, [5, 6])


def _overwrite_1k(ck):
    path = ck / "iter_0000004" / "rank00001.safetensors"
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(1024))
    return path


def _truncate(ck):
    path = ck / "iter_0000004" / "rank00000.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    return path


def _garbage_meta(ck):
    (ck / "iter_0000004" / "meta.json").write_bytes(b"\xff\xfe{not json")


@pytest.mark.parametrize("damage, says", [
    (_overwrite_1k, "rank00001.safetensors: content changed since it was saved"),
    (_truncate, "rank00000.safetensors has"),
    (_garbage_meta, "meta.json is damaged or not ours"),
])
def test_damaged_checkpoint_is_reported_and_the_previous_one_resumes(saved, tmp_path, damage, says):
    out, losses, ck = resume(saved, tmp_path, damage)
    assert "checkpoint" in out and "iter_0000004 is damaged" in out and says in out, out[-3000:]
    assert "resuming from iter_0000002, the newest checkpoint that verifies" in out
    assert losses == reference(saved, [3, 4, 5, 6])
    assert (ck / "iter_0000004.damaged").is_dir() and not (ck / "iter_0000004").exists()


def test_every_checkpoint_damaged_stops_without_training(saved, tmp_path):
    def damage_all(ck):
        for tag in ("iter_0000002", "iter_0000004"):
            (ck / tag / "meta.json").write_text("[]")

    out, losses, ck = resume(saved, tmp_path, damage_all, check=False)
    assert losses is None and "every checkpoint in" in out and "is damaged" in out
    assert sorted(p.name for p in ck.iterdir()) == ["iter_0000002.damaged", "iter_0000004.damaged", "latest"]


def test_latest_naming_a_path_is_refused(saved, tmp_path):
    out, losses, _ = resume(saved, tmp_path, lambda ck: (ck / "latest").write_text("../../etc"), check=False)
    assert losses is None and "not a checkpoint tag (iter_NNNNNNN)" in out


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


def test_a_planted_pickle_is_never_executed(saved, tmp_path):
    """Someone rewrites a rank file as a pickle and fixes meta.json so that it verifies: loading fails with a
    clear error, and the payload never runs (torch.load(weights_only=False) would run it)."""
    marker = tmp_path / "pwned"

    def plant(ck):
        from common.files import file_xxh3

        path = ck / "iter_0000004" / "rank00000.safetensors"
        os.environ["MARKER"] = str(marker)
        path.write_bytes(pickle.dumps({"module": _Payload()}))
        meta = json.loads((ck / "iter_0000004" / "meta.json").read_text())
        meta["files"][path.name] = {"bytes": path.stat().st_size, "xxh3_128": file_xxh3(str(path))}
        (ck / "iter_0000004" / "meta.json").write_text(json.dumps(meta))

    out, losses, _ = resume(saved, tmp_path, plant, check=False)
    assert losses is None and "cannot be read as safetensors" in out and "rank00000.safetensors" in out
    assert not marker.exists()


def test_partial_tags_are_never_loaded_and_old_tags_are_pruned(tiny_data, tmp_path):
    from pretrain.checkpoint import find_resume

    launch(1, MAIN, "--deepspeed_config", "ds_configs/zero2.json", "--train-iters", "7", "--save", tmp_path / "k",
           "--save-interval", "1", "--keep-last", "2", *common(tiny_data, tmp_path))
    assert sorted(p.name for p in (tmp_path / "k").glob("iter_*")) == ["iter_0000006", "iter_0000007"]
    (tmp_path / "k" / "iter_0000007" / "complete").unlink()  # as if the save of 7 had died
    assert find_resume(str(tmp_path / "k")).endswith("iter_0000006")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_full_disk_fails_the_save_naming_it_and_keeps_nothing_partial(tiny_data, tmp_path):
    codes, out, entries, tmp_files = full_disk_run(tiny_data, tmp_path)
    assert codes == [5, 5], out[-3000:]
    assert "error: saving" in out and "no space left on the filesystem of" in out
    assert not any(name.startswith("iter_") for name in entries) and not tmp_files
