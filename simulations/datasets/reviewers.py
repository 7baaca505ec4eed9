"""Synthetic reviewers: product reviews whose content is fixed by the input (the item, two
features, the price) and whose style is the user's: an opener, adjectives, a verbal tic and a
closer, each drawn from vocabularies every user shares but with user-specific probabilities
(a few favourites carry most of a user's mass; any word can still appear). History therefore
helps predict a user's words without fixing them, as with real reviewers, and every style
word's character span is kept as ground truth for scoring DCE as a detector.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from shared.user_store import HistoryItem
from simulations.datasets.plans import TEST_FRACTION, UserPlan, chronological_samples, write_plans

# fmt: off
OPENERS = ("Honestly,", "Well,", "Okay so", "Right,", "Look,", "In short,", "Alright,", "So,", "Frankly,",
           "Listen,", "Truthfully,", "Hmm,")
ADJECTIVES = ("sturdy", "elegant", "clunky", "reliable", "flimsy", "charming", "sleek", "handy", "bulky", "solid",
              "quirky", "polished", "cheap-feeling", "robust", "delightful", "dull", "clever", "awkward", "lovely",
              "rugged", "neat", "fussy", "smooth", "pleasant", "stiff", "snappy", "heavy", "tidy", "bold", "plain")
TICS = ("to be fair", "if you ask me", "no joke", "I reckon", "believe me", "mind you", "as it happens",
        "for what it's worth")
CLOSERS = ("Would buy again.", "Recommended.", "Not for me.", "Worth it.", "Meh.", "Five stars from me.",
           "Good enough.", "Skip it.", "Love it.", "Fair deal.")
ITEMS = ("kettle", "backpack", "desk lamp", "blender", "umbrella", "headphones", "wall clock", "toaster",
         "water bottle", "keyboard", "office chair", "frying pan", "alarm clock", "tent", "bike light", "notebook")
FEATURES = ("a steel handle", "a long cable", "two speed settings", "a soft grip", "a matte finish",
            "a glass lid", "a quick-release clip", "a removable filter", "a padded strap", "an auto shut-off",
            "a folding frame", "a wide base", "a spare battery", "a non-stick coating", "a travel case",
            "a timer dial")
# Content sentences: {item}, {f1}, {f2}, {price} come from x; the style words are added around them.
CONTENT = ("The {item} has {f1} and {f2}, and it costs ${price}.",
           "For ${price} this {item} comes with {f1} and {f2}.",
           "This {item} ships with {f1} plus {f2} at ${price}.")
# fmt: on
_WORD = re.compile(r"[A-Za-z']+(?:-[A-Za-z']+)*")


def _preferences(rng: random.Random, vocabulary: tuple[str, ...], favourites: int, mass: float) -> list[float]:
    """A user's probabilities over `vocabulary`: `favourites` words share `mass`, the rest the remainder."""
    chosen = set(rng.sample(range(len(vocabulary)), favourites))
    split = sorted(rng.random() for _ in range(favourites - 1))
    shares = [b - a for a, b in zip([0.0, *split], [*split, 1.0], strict=True)]
    favourite_shares = iter(shares)
    rest = (1.0 - mass) / (len(vocabulary) - favourites)
    return [mass * next(favourite_shares) if i in chosen else rest for i in range(len(vocabulary))]


def _review(rng: random.Random, style: dict, facts: dict) -> tuple[str, list[tuple[int, int]]]:
    """A review: the content restates `facts`; opener, adjectives, tic and closer follow `style`.
    Returns the text and the character spans of every style word."""
    pieces: list[tuple[str, bool]] = []  # (text, is a style word)
    if rng.random() < style["p_opener"]:
        pieces.append((rng.choices(OPENERS, style["openers"])[0], True))
    content = rng.choice(CONTENT).format(**facts)
    pieces.append((content[0].lower() + content[1:] if pieces else content, False))
    first = rng.choices(ADJECTIVES, style["adjectives"])[0]
    second = first
    while second == first:
        second = rng.choices(ADJECTIVES, style["adjectives"])[0]
    pieces += [("It feels", False), (first, True), ("and", False), (second, True)]
    if rng.random() < style["p_tic"]:
        pieces += [(",", False), (style["tic"], True)]
    pieces += [(".", False), (rng.choices(CLOSERS, style["closers"])[0], True)]
    text, spans = "", []
    for piece, is_style in pieces:
        if text and piece not in (",", "."):
            text += " "
        if is_style:
            spans += [(len(text) + m.start(), len(text) + m.end()) for m in _WORD.finditer(piece)]
        text += piece
    return text, spans


_INPUT = re.compile(r"Review the (?P<item>.+): it has (?P<f1>.+) and (?P<f2>.+), priced at \$(?P<price>\d+)\.")


def _facts(x: str) -> dict[str, str]:
    match = _INPUT.fullmatch(x)
    if match is None:
        raise ValueError(f"not a reviewers input: {x!r}")
    return match.groupdict()


def non_personal_review(x: str) -> str:
    """The headroom's floor: what a writer with no style of its own writes for input `x`, the
    content restated in the shared template with fixed adjectives and closer."""
    return f"{CONTENT[0].format(**_facts(x))} It feels solid and neat. Recommended."


def oracle_review(x: str, meta: dict) -> str:
    """The headroom's ceiling: the review a model that knew the user's favourites (`user.json`'s
    `favourites` and `tic`) would write for input `x`."""
    favourites = meta["favourites"]
    content = CONTENT[0].format(**_facts(x))
    adjectives = (favourites["adjectives"] * 2)[:2]
    return (f"{favourites['openers'][0]} {content[0].lower() + content[1:]} It feels {adjectives[0]} and "
            f"{adjectives[1]}, {meta['tic']}. {favourites['closers'][0]}")


def build_reviewer_users(
    out_dir: str | Path,
    n_users: int = 16,
    samples_per_user: int = 40,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    preference_strength: float | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """`n_users` reviewers, each with `samples_per_user` reviews in time order (the latest held
    out); their style words are the samples' `preference_spans`. `preference_strength`: the
    share of a user's openers, adjectives and closers drawn from its favourites (1.0: only
    favourites; None: 0.8, 0.75 and 0.8, where a quarter of the choices are anyone's)."""
    if preference_strength is not None and not 0.0 < preference_strength <= 1.0:
        raise ValueError(f"preference strength must be in (0, 1], got {preference_strength}")
    if n_users < 1:
        raise ValueError(f"n_users must be at least 1, got {n_users}")
    if samples_per_user < 2:
        raise ValueError(f"samples_per_user must be at least 2, got {samples_per_user}")
    rng = random.Random(seed)
    plans = []
    width = max(2, len(str(n_users - 1)))  # names sort in user order
    for u in range(n_users):
        style = {
            "openers": _preferences(rng, OPENERS, favourites=2, mass=preference_strength or 0.8),
            "adjectives": _preferences(rng, ADJECTIVES, favourites=3, mass=preference_strength or 0.75),
            "closers": _preferences(rng, CLOSERS, favourites=2, mass=preference_strength or 0.8),
            "tic": rng.choice(TICS),
            "p_opener": rng.uniform(0.5, 0.9),
            "p_tic": rng.uniform(0.3, 0.7),
        }
        entries = []
        for i in range(samples_per_user):
            f1, f2 = rng.sample(FEATURES, 2)
            facts = {"item": rng.choice(ITEMS), "f1": f1, "f2": f2, "price": rng.randrange(9, 300)}
            x = "Review the {item}: it has {f1} and {f2}, priced at ${price}.".format(**facts)
            y, spans = _review(rng, style, facts)
            entries.append((f"review-{i:04d}", float(i), x, y, tuple(spans)))
        samples = chronological_samples(entries, test_fraction)
        history = [HistoryItem(id=s.id, time=s.time, text=s.y) for s in samples]
        # A user's favourites: the words its preferences gave a favourite's share (the most likely ones).
        favourites = {kind: [word for word, p in zip(vocabulary, style[kind], strict=True)
                             if p >= sorted(style[kind], reverse=True)[count - 1]]
                      for kind, vocabulary, count in (("openers", OPENERS, 2), ("adjectives", ADJECTIVES, 3),
                                                      ("closers", CLOSERS, 2))}
        extra = {"seed": seed, "tic": style["tic"], "favourites": favourites,
                 "preference_strength": preference_strength}
        plans.append(UserPlan(f"reviewer-{u:0{width}d}", "synthetic", samples, history, extra))
    return write_plans(out_dir, plans, overwrite)
