"""Real users' chat messages: the Chit Chat Challenge conversations that the PyPI package
`chitchat-dataset` (MIT, BYU PCC lab) ships, 7,168 two-person conversations by 1,315 senders.

A user is a sender with at least `min_conversations` conversations. A sample is one of the
user's messages in a conversation: x = the conversation's prompt and the turns just before the
message (each turn labelled by who wrote it), y = the message; the history a sample sees is the
user's own messages in earlier conversations (never the same one). Each user's latest
conversations are the test split. Which users are taken, when there are more than asked for,
is drawn with `seed`, so that every seed of a study sees other users.
"""

from __future__ import annotations

import random
from datetime import datetime
from pathlib import Path

from shared.user_store import HistoryItem, Sample
from simulations.datasets.plans import TEST_FRACTION, UserPlan, test_count, write_plans

MIN_CONVERSATIONS = 20
MAX_CONVERSATIONS = 40  # a user's latest conversations kept (the most active sender has 1,528)
MESSAGES_PER_CONVERSATION = 2  # of the user's messages, the first ones long enough
MIN_WORDS = 4  # shorter messages ("lol", "ok") say little about a user
CONTEXT_TURNS = 4  # turns before the message kept in x


def _dataset() -> dict:
    try:
        import chitchat_dataset
    except ImportError:
        raise ValueError("dataset 'chitchat' needs the package chitchat-dataset: pip install -c constraints.txt "
                         "chitchat-dataset") from None
    return chitchat_dataset.Dataset()


def _seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _turns(conversation: dict) -> list[tuple[str, str, float]]:
    """(sender, text, time) of every turn: a turn is one sender's consecutive utterances."""
    turns = []
    for message in conversation["messages"]:
        if not message:
            continue
        text = " ".join(u["text"].strip() for u in message if u["text"].strip())
        if text:
            turns.append((message[0]["sender"], text, _seconds(message[0]["timestamp"])))
    return turns


def _context(prompt: str, earlier: list[tuple[str, str, float]], user: str) -> str:
    lines = [f"Conversation topic: {prompt}"]
    lines += [f"{'User' if sender == user else 'Partner'}: {text}" for sender, text, _ in earlier[-CONTEXT_TURNS:]]
    return "\n".join(lines)


def _user_plan(user: str, conversations: list[tuple[str, dict]], test_fraction: float, index: int) -> UserPlan:
    conversations = sorted(conversations, key=lambda entry: (_seconds(entry[1]["start"]), entry[0]))
    conversations = conversations[-MAX_CONVERSATIONS:]
    n_test = test_count(len(conversations), test_fraction)
    samples: list[Sample] = []
    earlier_ids: list[str] = []  # the user's messages of earlier conversations
    for number, (conversation_id, conversation) in enumerate(conversations):
        turns = _turns(conversation)
        split = "test" if number >= len(conversations) - n_test else "train"
        own = [i for i, (sender, text, _) in enumerate(turns) if sender == user and len(text.split()) >= MIN_WORDS]
        these = []
        for i in own[:MESSAGES_PER_CONVERSATION]:
            sample_id = f"{conversation_id[:8]}-{i:02d}"
            these.append(sample_id)
            topic = conversation.get("prompt") or "(none)"
            samples.append(Sample(id=sample_id, time=turns[i][2], x=_context(topic, turns[:i], user),
                                  y=turns[i][1], split=split, history_ids=tuple(earlier_ids)))
        earlier_ids += these
    history = [HistoryItem(id=s.id, time=s.time, text=s.y) for s in samples]
    extra = {"sender": user, "conversations": len(conversations)}
    return UserPlan(f"chitchat-{index:03d}", "chitchat", samples, history, extra)


def build_chitchat_users(
    out_dir: str | Path,
    max_users: int | None = None,
    min_conversations: int = MIN_CONVERSATIONS,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """The stores of the senders with at least `min_conversations` conversations (86 at 20); with
    `max_users`, that many of them drawn with `seed`. Users are named by their rank among all
    eligible senders (most conversations first), so a user keeps its name across draws."""
    if max_users is not None and max_users < 0:
        raise ValueError(f"max_users must not be negative, got {max_users}")
    if min_conversations < 2:
        raise ValueError(f"min_conversations must be at least 2, got {min_conversations}")
    by_sender: dict[str, list[tuple[str, dict]]] = {}
    for conversation_id, conversation in sorted(_dataset().items()):
        for sender in sorted({u["sender"] for m in conversation["messages"] for u in m}):
            by_sender.setdefault(sender, []).append((conversation_id, conversation))
    eligible = sorted((s for s, convs in by_sender.items() if len(convs) >= min_conversations),
                      key=lambda s: (-len(by_sender[s]), s))
    if not eligible:
        raise ValueError(f"no chitchat sender has {min_conversations} conversations")
    ranks = range(len(eligible))
    if max_users:  # None or 0: every eligible sender
        if max_users > len(eligible):
            raise ValueError(f"chitchat has {len(eligible)} senders with at least {min_conversations} conversations, "
                             f"fewer than the {max_users} users asked for")
        ranks = sorted(random.Random(seed).sample(ranks, max_users))
    plans = [_user_plan(eligible[rank], by_sender[eligible[rank]], test_fraction, rank) for rank in ranks]
    plans = [plan for plan in plans if any(s.split == "train" for s in plan.samples)
             and any(s.split == "test" for s in plan.samples)]
    return write_plans(out_dir, plans, overwrite)

