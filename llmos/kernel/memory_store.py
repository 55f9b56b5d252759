"""Recall and archival memory: SQLite FTS5 tables, ranked by BM25, in the kernel's own
database. Why FTS5: it is already in the SQLite the kernel writes its transcripts to (no new
dependency, no embedding model to load beside the LLM on a small machine), it commits in the
same transactions, survives restarts with the processes, and answers in well under a
millisecond at this size. `bm25s` or embeddings would add recall for paraphrases; the
benchmark's questions share words with their evidence, as most agent look-ups do."""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass

from llmos.kernel.store import Store, migration

PASSAGE_WORDS = 200  # an archived document is stored as passages of about this many words
_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    "a an and are as at be but by do does for from has have how i in is it its me my of on or "
    "our so that the their them then there they this to was we were what when where which who "
    "why will with you your".split()
)


@migration
def m100_memory(db: sqlite3.Connection) -> None:
    """Recall memory (what left a process's window) and archival memory (what it stored)."""
    db.execute(
        "CREATE VIRTUAL TABLE recall USING fts5(content, pid UNINDEXED, ref UNINDEXED,"
        " role UNINDEXED, created_at UNINDEXED, tokenize='porter unicode61')"
    )
    db.execute(
        "CREATE VIRTUAL TABLE archive USING fts5(content, pid UNINDEXED, source UNINDEXED,"
        " created_at UNINDEXED, tokenize='porter unicode61')"
    )


@dataclass(frozen=True, slots=True)
class Hit:
    ref: str  # recall: the message's index in the conversation; archive: the row id
    role: str  # recall: the message's role; archive: its source
    content: str
    score: float  # BM25 (lower is better, as SQLite reports it)


def match_query(text: str) -> str | None:
    """Free text → an FTS5 query: any of its words (quoted, so no syntax leaks through)."""
    words = [w for w in _WORD.findall(text.lower()) if w not in _STOP]
    words = list(dict.fromkeys(words))[:32]
    return " OR ".join(f'"{w}"' for w in words) or None


def recall_add(store: Store, pid: int, items: list[tuple[str, str, str]]) -> None:
    """(ref, role, content) rows for messages that left the window."""
    now = time.time()
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO recall (content, pid, ref, role, created_at) VALUES (?, ?, ?, ?, ?)",
            [(content, pid, ref, role, now) for ref, role, content in items if content],
        )


def recall_refs(store: Store, pid: int) -> set[str]:
    return {r[0] for r in store.query("SELECT ref FROM recall WHERE pid = ?", (pid,))}


def _search(
    store: Store, table: str, extra: str, pid: int, query: str, k: int, words: int = 0
) -> list[Hit]:
    """The `k` best BM25 matches; `words` > 0: FTS5's snippet of that many tokens around the
    matched terms instead of the whole content."""
    q = match_query(query)
    if q is None:
        return []
    text = f"snippet({table}, 0, '', '', ' … ', {int(words)})" if words else "content"
    rows = store.query(
        f"SELECT {extra}, {text} AS content, bm25({table}) AS score FROM {table}"
        f" WHERE {table} MATCH ? AND pid = ? ORDER BY score LIMIT ?",
        (q, pid, k),
    )
    return [Hit(str(r[0]), str(r[1]), r["content"], r["score"]) for r in rows]


def recall_search(store: Store, pid: int, query: str, k: int = 5, words: int = 0) -> list[Hit]:
    return _search(store, "recall", "ref, role", pid, query, k, words)


def passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """A long text in passages, so no one hit can be larger than a window can hold."""
    parts = text.split()
    return [" ".join(parts[i : i + words]) for i in range(0, len(parts), words)] or []


def archive_insert(store: Store, pid: int, text: str, source: str = "") -> int:
    """Store a document (as passages); returns how many passages."""
    chunks = passages(text)
    now = time.time()
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO archive (content, pid, source, created_at) VALUES (?, ?, ?, ?)",
            [(c, pid, source, now) for c in chunks],
        )
    return len(chunks)


def archive_search(store: Store, pid: int, query: str, k: int = 5) -> list[Hit]:
    return _search(store, "archive", "rowid, source", pid, query, k)
