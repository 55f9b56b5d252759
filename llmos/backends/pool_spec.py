"""Pool specs, as programs and the CLI name them:

    pool:[local:smollm2-135m, openai_http:m@http://host:8000/v1]
    pool:[local, openai_http:m@URL]?failures=2&cooldown=5&when_all_cooling=fail
    pool:pool.yaml          (members with a price, a context window, a timeout, a policy)

A YAML/JSON file (or a dict) holds `members` (backend names, or mappings with `backend`,
`price`, `context_window`, `timeout`, `policy`) and any PoolConfig field."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from llmos.backends.pool import Member, Pool, PoolConfig

MEMBER_KEYS = ("backend", "price", "context_window", "timeout", "policy")
CONFIG_KEYS = tuple(f.name for f in fields(PoolConfig))


def split_members(text: str) -> list[str]:
    """`a, b, pool:[c, d]` → ["a", "b", "pool:[c, d]"] (commas inside brackets stay)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += {"[": 1, "]": -1}.get(ch, 0)
        cur += ch
    parts.append(cur.strip())
    return [p for p in parts if p]


def _number(key: str, value: str) -> Any:
    if key == "when_all_cooling":
        return value
    try:
        return int(value) if key in ("failures", "retries") else float(value)
    except ValueError:
        raise ValueError(f"pool option {key}: expected a number, got {value!r}") from None


def parse(rest: str) -> Pool:
    """What follows `pool:` in a backend name."""
    rest = rest.strip()
    if not rest.startswith("["):
        path = Path(rest)
        if not path.is_file():
            raise ValueError(f"model: pool spec {rest!r} is neither [members] nor a file")
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return from_dict(data, where=str(path))
    close = rest.rfind("]")
    if close < 0:
        raise ValueError(f"model: pool spec {rest!r} has no closing ']'")
    options: dict[str, Any] = {}
    tail = rest[close + 1 :]
    if tail:
        if not tail.startswith("?"):
            raise ValueError(f"model: after the pool's ']' expected ?key=value, got {tail!r}")
        for pair in tail[1:].split("&"):
            key, eq, value = pair.partition("=")
            if not eq or key not in CONFIG_KEYS:
                raise ValueError(
                    f"pool option {key!r}: expected key=value with key one of "
                    f"{', '.join(CONFIG_KEYS)}"
                )
            options[key] = _number(key, value)
    return from_dict({"members": split_members(rest[1:close]), **options})


def from_dict(data: Any, where: str = "pool") -> Pool:
    from llmos.backends import resolve

    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping with 'members'")
    unknown = set(data) - {"members", "name", *CONFIG_KEYS}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    entries = data.get("members")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{where}.members: a non-empty list of backends is required")
    members = []
    for i, entry in enumerate(entries):
        at = f"{where}.members[{i}]"
        if isinstance(entry, str):
            entry = {"backend": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("backend"), str):
            raise ValueError(f"{at}.backend: a backend name is required")
        bad = set(entry) - set(MEMBER_KEYS)
        if bad:
            raise ValueError(f"{at}: unknown field(s) {', '.join(sorted(bad))}")
        try:
            backend = resolve(entry["backend"])
        except ValueError as exc:
            raise ValueError(f"{at}.backend: {str(exc).removeprefix('model: ')}") from None
        try:
            members.append(Member(backend, **{k: v for k, v in entry.items() if k != "backend"}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{at}.{exc}") from None
    config = {k: data[k] for k in CONFIG_KEYS if k in data}
    try:
        return Pool(members, PoolConfig(**config), name=data.get("name"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}.{exc}") from None
