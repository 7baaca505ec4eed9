"""The rule of every command that writes: nothing that holds something is replaced unless asked
for, and a replacement is whole or not at all."""

import os

import pytest

from shared.paths import OutputExistsError, atomic_directory, atomic_write_text, ensure_folder, refuse_to_replace


def _listing(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_a_file_or_a_folder_with_files_is_refused_with_the_flag_named(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "samples.jsonl").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine")
    for target, what in (("store", "a folder with files"), ("notes.txt", "a file")):
        with pytest.raises(OutputExistsError, match=f"{target} already holds {what} .* pass --overwrite to replace"):
            refuse_to_replace(tmp_path / target, overwrite=False)
    (tmp_path / "empty").mkdir()
    refuse_to_replace(tmp_path / "empty", overwrite=False)
    refuse_to_replace(tmp_path / "absent", overwrite=False)
    refuse_to_replace(tmp_path / "store", overwrite=True)


def test_a_refused_atomic_directory_writes_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = _listing(tmp_path)
    with pytest.raises(OutputExistsError), atomic_directory(tmp_path / "out") as staging:
        (staging / "new.txt").write_text("new")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_overwrite_replaces_a_file_or_a_folder_whole_and_leaves_no_debris(tmp_path, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_text("old")
    else:
        target.mkdir()
        (target / "old.txt").write_text("old")
    with atomic_directory(target, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert sorted(os.listdir(target)) == ["new.txt"]


def test_a_failure_while_writing_leaves_the_old_content_in_place(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    before = _listing(tmp_path)
    with pytest.raises(RuntimeError, match="interrupted"), atomic_directory(target, overwrite=True) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert _listing(tmp_path) == before


def test_a_new_folder_follows_the_umask_not_0700(tmp_path):
    with atomic_directory(tmp_path / "out") as staging:
        (staging / "a.txt").write_text("a")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~mask


def test_writing_under_a_regular_file_names_the_file(tmp_path):
    (tmp_path / "regular").write_text("x")
    with pytest.raises(NotADirectoryError, match="regular is a file, not a folder"):
        ensure_folder(tmp_path / "regular" / "certs")
    with pytest.raises(NotADirectoryError, match="regular is a file, not a folder"):
        atomic_write_text(tmp_path / "regular" / "certs" / "ca.crt", "x")
    assert (tmp_path / "regular").read_text() == "x"
