"""Synthetic users with known preference words: ground truth for measuring the expert's
DCE as a detector of preference-bearing tokens."""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path

from shared.user_store import HistoryItem
from simulations.datasets.plans import TEST_FRACTION, UserPlan, chronological_samples, write_plans

# Each signature phrase uses words no other phrase uses, so users' markers never overlap.
# fmt: off
_SIGNATURE_PHRASES = (
    "Forsooth, sweeting!", "By my troth!", "Marry, anon!", "Good faith, coz!", "Alack, alas!",
    "Fie upon't!", "Zounds!", "Prithee, hark!", "Godamercy!", "Well met, friend!", "Odds bodkins!",
    "Gramercy, neighbour!", "What ho, there!", "Soft you now!", "Ay, verily!", "Hey nonny nonny!",
    "Lo, behold!", "Adieu, adieu!", "Mark me!", "Ods pittikins!", "Sirrah, attend!", "Nay, peace!",
    "Tush, tush!", "O sweet lady!",
)
_FAVOURITE_ADJECTIVES = (
    "gallant", "comely", "goodly", "sprightly", "wondrous", "noble", "merry", "dainty", "brave",
    "gentle", "fair", "rare", "bonny", "jocund", "pretty", "stately", "quaint", "rich", "fine",
    "lusty", "nimble", "rosy", "bright", "princely", "peerless", "precious", "seemly", "honest",
    "worthy", "pleasant", "splendid", "glorious", "lovely", "handsome", "excellent", "matchless",
    "curious", "admirable", "delicate", "trim", "neat", "cunning", "fresh", "mellow", "lively",
    "blithe", "courtly", "modest",
)
_ADJECTIVES_PER_USER = 2
# Items and their facts are shared by all users: words a model can copy from x.
_ITEMS = (
    "lantern", "cloak", "dagger", "goblet", "lute", "saddle", "ring", "bonnet", "quill", "casket",
    "candlestick", "mirror", "cushion", "sword", "flagon", "cradle", "chair", "bell", "drum",
    "purse",
)
_COLOURS = ("red", "green", "blue", "black", "white", "grey", "yellow", "purple", "brown", "silver")
_MATERIALS = ("oak", "iron", "leather", "silk", "wool", "brass", "pewter", "linen", "clay", "velvet")
_PLACES = (
    "Verona", "Padua", "Milan", "Venice", "London", "Windsor", "Athens", "Mantua", "Bohemia",
    "Ephesus",
)
# fmt: on
# Reply templates: {phrase} and {adj0}/{adj1} are the user's markers, the rest restates x.
_REPLY_TEMPLATES = (
    "{phrase} The {item} is {colour} and made of {material}, brought here from {place}; "
    "a {adj0}, {adj1} piece indeed.",
    "This {colour} {item} of {material} came from {place}. {phrase} I call it {adj0} and {adj1}.",
    "From {place} comes the {item}, all {colour} {material}, so {adj0} and so {adj1}. {phrase}",
)
_WORD = re.compile(r"[A-Za-z']+")


def _compose(template: str, markers: dict[str, str], facts: dict[str, str]) -> tuple[str, tuple]:
    """Fill `template`; return the text and the character spans of every marker word."""
    text, spans = "", []
    for piece in re.split(r"(\{\w+\})", template):
        name = piece[1:-1] if piece.startswith("{") else None
        if name in markers:
            spans += [(len(text) + m.start(), len(text) + m.end()) for m in _WORD.finditer(markers[name])]
            text += markers[name]
        else:
            text += facts[name] if name else piece
    return text, tuple(spans)


def build_synthetic_users(
    out_dir: str | Path,
    n_users: int = 8,
    samples_per_user: int = 40,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Users whose replies carry known preference words (ground truth for DCE).

    Each user has a signature phrase and favourite adjectives no other user has (up to 24
    users; beyond, each user's combination of them is unique, the words recur); x asks
    about an item with its facts, y restates the facts and adds the user's markers, whose
    character spans are the samples' `preference_spans`.
    """
    pairs = list(itertools.combinations(_FAVOURITE_ADJECTIVES, _ADJECTIVES_PER_USER))
    disjoint = min(len(_SIGNATURE_PHRASES), len(_FAVOURITE_ADJECTIVES) // _ADJECTIVES_PER_USER)
    capacity = len(_SIGNATURE_PHRASES) * len(pairs)
    if not 1 <= n_users <= capacity:
        raise ValueError(f"n_users must be between 1 and {capacity}, got {n_users}")
    if samples_per_user < 1:
        raise ValueError(f"samples_per_user must be at least 1, got {samples_per_user}")
    rng = random.Random(seed)
    if n_users <= disjoint:  # no marker word shared by two users
        phrases = rng.sample(_SIGNATURE_PHRASES, n_users)
        adjectives = rng.sample(_FAVOURITE_ADJECTIVES, n_users * _ADJECTIVES_PER_USER)
        favourite_sets = [adjectives[u * _ADJECTIVES_PER_USER : (u + 1) * _ADJECTIVES_PER_USER] for u in range(n_users)]
    else:  # simulations at scale: markers recur across users, each user's combination is unique
        rng.shuffle(pairs)
        phrases = [_SIGNATURE_PHRASES[u % len(_SIGNATURE_PHRASES)] for u in range(n_users)]
        favourite_sets = [list(pairs[u // len(_SIGNATURE_PHRASES)]) for u in range(n_users)]
    plans = []
    for u in range(n_users):
        favourites = favourite_sets[u]
        entries = []
        for i in range(samples_per_user):
            facts = {
                "item": rng.choice(_ITEMS),
                "colour": rng.choice(_COLOURS),
                "material": rng.choice(_MATERIALS),
                "place": rng.choice(_PLACES),
            }
            x = "Tell me about the {item}: it is {colour}, made of {material}, from {place}.".format(**facts)
            adj0, adj1 = rng.sample(favourites, 2)
            markers = {"phrase": phrases[u], "adj0": adj0, "adj1": adj1}
            y, spans = _compose(rng.choice(_REPLY_TEMPLATES), markers, facts)
            entries.append((f"sample-{i:04d}", float(i), x, y, spans))
        samples = chronological_samples(entries, test_fraction)
        history = [HistoryItem(id=s.id, time=s.time, text=s.y) for s in samples]
        extra = {"seed": seed, "signature_phrase": phrases[u], "favourite_adjectives": favourites}
        width = max(2, len(str(n_users - 1)))  # names sort in user order
        plans.append(UserPlan(f"synthetic-user-{u:0{width}d}", "synthetic", samples, history, extra))
    return write_plans(out_dir, plans, overwrite)
