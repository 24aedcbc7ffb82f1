"""qfusion.files: a file is replaced whole or not at all."""

import json

import pytest

from qfusion.files import read_json_lines, write_atomically, write_json, write_text


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "fits.json"
    path.write_text("old")
    assert write_json({"a": [1, 2]}, path) == path
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["fits.json"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "figure.png"
    path.write_bytes(b"old figure")

    def half_written(temporary):
        temporary.write_bytes(b"new fig")
        raise RuntimeError("the writer failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        write_atomically(path, half_written)
    assert path.read_bytes() == b"old figure"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_a_missing_directory_is_named_with_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"path: no directory '.*missing' to write '.*missing/fits.json' in"):
        write_json({}, tmp_path / "missing" / "fits.json")
    assert list(tmp_path.iterdir()) == []


def test_write_json_writes_non_finite_floats_as_null_and_sorts_keys_on_request(tmp_path):
    path = write_json({"b": [float("nan"), 1.5], "a": {"c": float("inf")}}, tmp_path / "fit.json", sort_keys=True)
    text = path.read_text()
    assert json.loads(text) == {"a": {"c": None}, "b": [None, 1.5]}
    assert text.index('"a"') < text.index('"b"') and text.endswith("\n")


def test_write_text_keeps_the_text_exactly(tmp_path):
    text = '{"step": 1}\n{"step": 2}\n'
    assert write_text(tmp_path / "metrics.jsonl", text).read_text() == text


def test_read_json_lines_skips_blank_lines_and_names_a_line_that_is_not_json(tmp_path):
    path = tmp_path / "records.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{oops\n')
    lines = read_json_lines(path, lambda number: f"records.jsonl:{number}")
    assert next(lines) == (1, {"a": 1}) and next(lines) == (3, [2])
    with pytest.raises(ValueError, match=r"^records.jsonl:4: not JSON \(Expecting property name"):
        next(lines)
