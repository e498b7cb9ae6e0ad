"""write_atomic: a failed write leaves the old file as it was and no temp file behind."""

import json

import pytest

from semroute.fileio import write_atomic, write_json


def test_write_json_round_trip_and_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "results.json"
    write_json(path, {"x": [1, 2.5], "y": "z"})
    assert json.loads(path.read_text()) == {"x": [1, 2.5], "y": "z"}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"old": 1})

    def broken(tmp):
        tmp.write_text('{"new": ')  # half written, then the writer dies
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomic(path, broken)
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_unserialisable_data_writes_nothing(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert not any(tmp_path.iterdir())
