"""Multi-turn drift: the per-turn projection series of each conversation, in bounded memory.

A client names a conversation with the ``X-Conversation-Id`` header (both APIs) or a ``conversation_id`` field in
the request body; each finished reply (choice 0) becomes one turn: its response-mean and last-prompt-token
projections per monitored trait. ``ConversationLog`` keeps the ``max_conversations`` most recently active
conversations (least recently used dropped first) and the last ``max_turns`` turns of each, so a client that
invents a new id per request costs a fixed amount of memory.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from steerlib.serve.schema import ApiError

__all__ = ["CONVERSATION_HEADER", "ConversationLog", "Turn", "check_conversation_id", "turn_bucket"]

CONVERSATION_HEADER = "x-conversation-id"
# Ids end up as Prometheus label values and in URLs: a short, plain alphabet keeps both safe.
_ID = re.compile(r"[A-Za-z0-9._:\-]{1,64}")
# Turn-number buckets of the bounded per-turn metric: long conversations fold into the last one.
TURN_BUCKETS = ((1, "1"), (3, "2-3"), (7, "4-7"), (15, "8-15"))
LAST_TURN_BUCKET = "16+"


def turn_bucket(turn: int) -> str:
    """The label of a 1-based turn number: ``1``, ``2-3``, ``4-7``, ``8-15`` or ``16+``."""
    for upper, label in TURN_BUCKETS:
        if turn <= upper:
            return label
    return LAST_TURN_BUCKET


def check_conversation_id(header: str | None, body: str | None) -> str | None:
    """The request's conversation id from the header and/or the body field (400 if bad or contradictory).

    Args:
        header: the ``X-Conversation-Id`` header's value, or None.
        body: the body's ``conversation_id``, or None.

    Returns:
        The id, or None when the request names no conversation.
    """
    if header is not None and body is not None and header != body:
        raise ApiError(400, f"X-Conversation-Id {header!r} and conversation_id {body!r} differ; send one",
                       param="conversation_id")
    cid = header if header is not None else body
    if cid is None:
        return None
    if not _ID.fullmatch(cid):
        raise ApiError(400, "conversation_id must be 1-64 characters of A-Z a-z 0-9 . _ : -", param="conversation_id",
                       code="invalid_value")
    return cid


@dataclass(frozen=True)
class Turn:
    """One assistant reply of a conversation.

    Attributes:
        turn: 1-based number of the reply in its conversation (kept counting when old turns are dropped).
        timestamp: when it finished (seconds since the epoch).
        steering: ``none``, ``steered`` or ``gated``.
        completion_tokens: tokens generated.
        projections: trait -> ``{"mean": response mean, "prompt_last": last prompt token}`` (None if unknown).
    """

    turn: int
    timestamp: float
    steering: str
    completion_tokens: int
    projections: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {"turn": self.turn, "timestamp": self.timestamp, "steering": self.steering,
                "completion_tokens": self.completion_tokens,
                "projections": {t: dict(p) for t, p in self.projections.items()}}


class ConversationLog:
    """Bounded LRU of conversations, each a bounded series of turns; safe across threads."""

    def __init__(self, max_conversations: int = 1024, max_turns: int = 256):
        """Set the bounds.

        Args:
            max_conversations: conversations kept (0: tracking off).
            max_turns: most recent turns kept per conversation.
        """
        if max_conversations < 0 or max_turns < 1:
            raise ValueError(f"max_conversations must be >= 0 and max_turns >= 1, got {max_conversations}, "
                             f"{max_turns}")
        self.max_conversations = max_conversations
        self.max_turns = max_turns
        self._items: OrderedDict[str, tuple[int, deque[Turn]]] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0  # conversations evicted to stay within max_conversations

    @property
    def enabled(self) -> bool:
        return self.max_conversations > 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def record(self, cid: str, projections: Mapping[str, Mapping[str, Any]], *, steering: str,
               completion_tokens: int, timestamp: float | None = None) -> Turn | None:
        """Append one reply to conversation ``cid`` (created or moved to most recent).

        Args:
            cid: the conversation id.
            projections: the completion's ``trait_projections`` (``mean`` and ``prompt_last`` are kept).
            steering: the request's steering label.
            completion_tokens: tokens generated.
            timestamp: seconds since the epoch (default: now).

        Returns:
            The recorded turn, or None when tracking is off.
        """
        if not self.enabled:
            return None
        kept = {t: {"mean": p.get("mean"), "prompt_last": p.get("prompt_last")} for t, p in projections.items()}
        with self._lock:
            count, turns = self._items.pop(cid, (0, deque(maxlen=self.max_turns)))
            turn = Turn(turn=count + 1, timestamp=time.time() if timestamp is None else timestamp, steering=steering,
                        completion_tokens=completion_tokens, projections=kept)
            turns.append(turn)
            self._items[cid] = (count + 1, turns)
            while len(self._items) > self.max_conversations:
                self._items.popitem(last=False)
                self.dropped += 1
        return turn

    def get(self, cid: str) -> dict[str, Any] | None:
        """The conversation's turns (oldest kept first) and its total count, or None if not tracked."""
        with self._lock:
            item = self._items.get(cid)
            if item is None:
                return None
            count, turns = item[0], list(item[1])
        return {"id": cid, "turns": count, "kept": len(turns), "series": [t.as_dict() for t in turns]}

    def recent(self, k: int) -> list[tuple[str, int, Turn, Turn]]:
        """The ``k`` most recently active conversations, newest first.

        Returns:
            (id, number of turns, first kept turn, last turn) per conversation.
        """
        if k <= 0:
            return []
        with self._lock:
            out = []
            for cid in reversed(self._items):
                count, turns = self._items[cid]
                out.append((cid, count, turns[0], turns[-1]))
                if len(out) == k:
                    break
        return out
