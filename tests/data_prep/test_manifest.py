"""data_prep.manifest: names read from a manifest never lead outside its directory, and a manifest that is not
ours is an error naming the file."""
import json

import pytest

from data_prep import manifest
from data_prep.merge import merge


def _write(d, shards, name="manifest.json", **extra):
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps({"format": manifest.FORMAT, "shards": shards, **extra}))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "sub/shard", "..", "."])
def test_shard_names_that_leave_the_directory_are_refused(tmp_path, bad):
    _write(tmp_path / "d", [{"path": "shard-r000-00000", "tokens": 1}, {"path": bad, "tokens": 1}])
    with pytest.raises(manifest.ManifestError, match="not a plain file name inside the data directory"):
        manifest.shards(str(tmp_path / "d"))
    _write(tmp_path / "r", [{"path": bad, "tokens": 1}], name=manifest.rank_manifest_name(0), rank=0, world_size=1)
    with pytest.raises(manifest.ManifestError, match="not a plain file name"):
        merge(str(tmp_path / "r"))
    with pytest.raises(ValueError, match="not a plain file name"):
        merge(str(tmp_path / "r"), into=bad)


def test_a_damaged_manifest_names_the_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "manifest.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(manifest.ManifestError, match=f"{d / 'manifest.json'}: not a valid data_prep manifest"):
        manifest.read(str(d))
    (d / "manifest.json").write_text(json.dumps({"shards": [{"path": "x"}]}))  # no token count
    with pytest.raises(manifest.ManifestError, match="manifest.json: not a valid"):
        manifest.read(str(d))
