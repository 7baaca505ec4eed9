"""Where NextQuill-Fed keeps its files, and how it writes them without leaving them half written."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "NEXTQUILL_HOME"


def data_dir() -> Path:
    """The one data directory (models, user stores, caches): `$NEXTQUILL_HOME`, else
    `~/.cache/nextquill`."""
    root = os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "nextquill"
    return Path(root).expanduser()


class OutputExistsError(FileExistsError):
    """A command was pointed at a path that already holds something it did not write."""


def holds_something(path: Path) -> bool:
    """Whether `path` is a file (or a link, or anything but a folder), or a folder that is not empty."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def refuse_to_replace(target: Path, overwrite: bool, why: str = "that this command did not write") -> None:
    """The rule of every command that writes: a path that holds something is replaced only when
    the user asked for it (`--overwrite`); an absent path or an empty folder may be written."""
    target = Path(target)
    if overwrite or not holds_something(target):
        return
    what = "a folder with files" if target.is_dir() and not target.is_symlink() else "a file"
    raise OutputExistsError(
        f"{target} already holds {what} {why}; choose another path, or pass --overwrite to replace it (the old "
        "content is removed only once the new one is complete)"
    )


def ensure_folder(folder: Path) -> None:
    """Create `folder` and its parents; a clear error when a part of the path is a file."""
    folder = Path(folder)
    for part in (folder, *folder.parents):
        if part.exists():
            if not part.is_dir():
                raise NotADirectoryError(f"cannot write under {folder}: {part} is a file, not a folder")
            break
    folder.mkdir(parents=True, exist_ok=True)


def atomic_write_png(figure: Any, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure as a PNG at `path`, written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` through a temporary file in the same folder and a rename,
    so readers see the old file or the new one, never a partial one."""
    path = Path(path)
    ensure_folder(path.parent)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write the file {path}: a folder of that name exists")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_text(obj: Any) -> str:
    """The project's JSON file format: indented, keys sorted, a final newline."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def jsonl_text(rows: list[dict[str, Any]]) -> str:
    """JSON Lines: one row per line."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json_text(obj))


def atomic_write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(path, jsonl_text(rows))


@contextlib.contextmanager
def atomic_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it takes the place of `target`.

    A `target` that holds something (`refuse_to_replace`) is replaced only when `overwrite`,
    and only once the new content is complete: the old one is moved aside, the new one
    renamed into place, then the old one removed. On any error the temporary folder is
    removed and `target` is left as it was.
    """
    target = Path(target)
    refuse_to_replace(target, overwrite)
    ensure_folder(target.parent)
    staging = _fresh_folder(target, "partial")
    try:
        yield staging
        if target.exists() or target.is_symlink():
            retired = _fresh_folder(target, "old")
            os.replace(target, retired / target.name)
            os.replace(staging, target)
            shutil.rmtree(retired)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


STAGING = re.compile(r"\..+\.[0-9a-f]{8}\.(partial|old)")  # the names `atomic_directory` stages under


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove what an `atomic_directory` killed outright (SIGKILL, a power cut) left directly in
    `folder`: hidden folders of its own naming, never anything else. Only call it while no
    other process writes into `folder` (under its lock); returns what it removed."""
    stale = [p for p in Path(folder).iterdir() if p.is_dir() and not p.is_symlink() and STAGING.fullmatch(p.name)] \
        if Path(folder).is_dir() else []
    for path in stale:
        shutil.rmtree(path)
    return stale


def _fresh_folder(beside: Path, kind: str) -> Path:
    """A new hidden folder next to `beside`, made with the user's umask (mkdtemp's are 0700)."""
    while True:
        folder = beside.with_name(f".{beside.name}.{uuid.uuid4().hex[:8]}.{kind}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (for example: one process builds the base model
    while the others wait for it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
