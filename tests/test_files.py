"""sap.files: atomic files and folders, JSON with NaN as null (the one module every writer uses)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from sap.errors import SapError
from sap.files import (
    _umask,
    atomic_write,
    atomic_write_text,
    nan_to_none,
    publish_files,
    staged_folder,
    staging_folder,
    write_json,
)


def test_json_writes_nan_as_null_and_numpy_as_plain(tmp_path):
    value = {"a": math.nan, "b": [np.float32(0.5), (np.int64(3), -math.inf)], "c": "x"}
    assert nan_to_none(value) == {"a": None, "b": [0.5, [3, None]], "c": "x"}
    path = write_json(tmp_path / "s.json", value)
    assert json.loads(path.read_text()) == {"a": None, "b": [0.5, [3, None]], "c": "x"}
    with pytest.raises(SapError, match="output exists"):
        write_json(path, {}, overwrite=False)


def test_failed_write_leaves_neither_temporary_nor_damaged_file(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def fail(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_folder_is_swapped_in_whole(tmp_path):
    folder = tmp_path / "bundle"
    for text in ("first", "second"):
        with staged_folder(folder) as staging:
            (staging / "f.txt").write_text(text)
        assert (folder / "f.txt").read_text() == text
    with pytest.raises(RuntimeError), staged_folder(folder) as staging:
        (staging / "f.txt").write_text("half")
        raise RuntimeError("killed")
    with staged_folder(folder, replace=False) as staging:  # another process published first: theirs stays
        (staging / "f.txt").write_text("late")
    assert (folder / "f.txt").read_text() == "second" and sorted(os.listdir(tmp_path)) == ["bundle"]
    assert oct(folder.stat().st_mode & 0o777) == oct(0o777 & ~_umask())
    staging = staging_folder(folder / "case", parent=folder)
    (staging / "a.txt").write_text("a")
    assert publish_files(staging, ["a.txt"], folder) == [folder / "a.txt"] and (folder / "a.txt").is_file()
