"""Stored responses (`store: true`) in SQLite, so a conversation continues by
`previous_response_id` and `GET`/`DELETE /v1/responses/{id}` work.

Each row keeps the Response object and the input items that led to it (the whole chain's, so
continuing needs one read). Rows older than `RETENTION_DAYS` are dropped when the store opens,
as OpenAI keeps stored responses for 30 days. Calls come from the server's event loop only.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.errors import RequestError

RETENTION_DAYS = 30
MEMORY = ":memory:"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    response TEXT NOT NULL,  -- the Response object, as JSON
    input TEXT NOT NULL      -- every input item of the conversation so far, as JSON
)
"""


@dataclass(slots=True, frozen=True)
class Stored:
    response: dict[str, Any]
    input: list[dict[str, Any]]

    def history(self) -> list[dict[str, Any]]:
        """The conversation up to and including this response's output."""
        return [*self.input, *self.response["output"]]


class ResponseStore:
    def __init__(self, path: str | Path = MEMORY) -> None:
        self.path = str(path)
        try:
            if self.path != MEMORY:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=10)
            if self.path != MEMORY:
                self._db.execute("PRAGMA journal_mode=WAL")
            with self._db:
                self._db.execute(_SCHEMA)
                cutoff = time.time() - RETENTION_DAYS * 86400
                self._db.execute("DELETE FROM responses WHERE created_at < ?", (cutoff,))
        except (sqlite3.Error, OSError) as exc:
            raise RequestError(
                f"responses_db: cannot open {self.path!r} as SQLite: {exc}", param="responses_db"
            ) from exc

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        with self._db:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, created_at, response, input) "
                "VALUES (?, ?, ?, ?)",
                (response["id"], time.time(), json.dumps(response), json.dumps(input_items)),
            )

    def get(self, response_id: str) -> Stored | None:
        row = self._db.execute(
            "SELECT response, input FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        return None if row is None else Stored(json.loads(row[0]), json.loads(row[1]))

    def delete(self, response_id: str) -> bool:
        with self._db:
            cur = self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
        return cur.rowcount > 0

    def close(self) -> None:
        self._db.close()
