"""Shakespeare users (real text, like LEAF's Shakespeare): every (user play, speaker) with
enough speeches is a user, from the plays of `shared.corpus`."""

from __future__ import annotations

from pathlib import Path

from shared import corpus
from shared.user_store import HistoryItem
from simulations.datasets.plans import TEST_FRACTION, UserPlan, chronological_samples, write_plans

MIN_SAMPLES = 30  # fewest speeches that make a speaker a user


def build_shakespeare_users(
    out_dir: str | Path,
    min_samples: int = MIN_SAMPLES,
    test_fraction: float = TEST_FRACTION,
    max_users: int | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """One store per (user play, speaker) with at least `min_samples` speeches.

    x is the cue (the speech before, or the scene heading), y the speech, time its index
    in the play; history is the speaker's earlier speeches; the latest speeches are test.
    Users come in play order, then speaker order; `max_users` keeps the first ones.
    """
    plans: list[UserPlan] = []
    for play in corpus.user_plays():
        play_speeches = corpus.speeches(play)
        for speaker, own in sorted(corpus.speeches_by_speaker(play).items()):
            if len(own) < min_samples:
                continue
            entries = [
                (f"speech-{s.index:05d}", float(s.index), corpus.cue_for(play_speeches, s.index), s.text, ())
                for s in own
            ]
            samples = chronological_samples(entries, test_fraction)
            history = [HistoryItem(id=s.id, time=s.time, text=s.y) for s in samples]
            extra = {"play": play, "speaker": speaker}
            plans.append(UserPlan(f"{play}/{speaker}", "shakespeare", samples, history, extra))
    if max_users is not None:
        plans = plans[:max_users]
    return write_plans(out_dir, plans, overwrite)
