"""The memory policies applied to one model call of a process (the loop's `fit` step):
`trim`, `summarize` (a model writes the summary, through the kernel's backend, its input
bounded and its tokens metered to the process) and `page` (what leaves the window goes to
recall memory; the best recall hits are paged in at the end of the prompt). Each call that had
to fit is recorded as a `Compaction` step; one that cannot fit records the overflow and stops
the process with a report (a memory event, never a silent cut)."""

from __future__ import annotations

from typing import Any

from llmos.backends.base import Backend, ChatRequest, Message
from llmos.kernel import journal, memory, memory_store, report
from llmos.kernel.memory import Compaction, ContextOverflow, Counter, SummaryTurn
from llmos.kernel.memory_config import MemoryConfig
from llmos.kernel.process import Process
from llmos.kernel.store import Store

report.ADVICE.setdefault(
    "context",
    "The prompt could not fit the context window even after compaction: shorten the system "
    "prompt, the tools or the task, lower max_tokens, or use a model with a longer context.",
)
SUMMARIZER = (
    "You keep a running summary of a conversation that no longer fits in a context window. "
    "Write the summary again so it keeps every fact, name, number and decision, the latest "
    "value of anything that changed, and what is still to do. Be brief. Reply with the "
    "summary only."
)
SUMMARY_NOTE = "Summary of the earlier conversation (it no longer fits in the context):\n"
PAGED_NOTE = "[From recall memory: earlier messages that may bear on this]\n"
PAGED_WORDS = 40  # a paged-in hit is FTS5's snippet of this many tokens around its matches
_COUNTERS: dict[int, Counter] = {}


def counter_for(backend: Backend, tools: list[dict[str, Any]]) -> Counter:
    """One per backend, so per-message counts are cached across a process's calls."""
    c = _COUNTERS.get(id(backend))
    if c is None or c.count_tokens != backend.count_tokens:
        if len(_COUNTERS) > 64:
            _COUNTERS.clear()
        estimate = backend.kind == "openai_http" or bool(getattr(backend, "estimates", False))
        c = _COUNTERS[id(backend)] = Counter(backend.count_tokens, estimate=estimate)
    c.tools = tools
    return c


def prior(proc: Process) -> Compaction | None:
    for s in reversed(proc.steps):
        if isinstance(s, Compaction) and s.overflow is None:
            return s
    return None


def config(proc: Process) -> MemoryConfig:
    return proc.program.memory_config


async def fit_call(
    proc: Process, ctx: Any, msgs: list[Message], tools: list[dict[str, Any]], room: int
) -> list[Message]:
    """The messages of one model call, made to fit `room` tokens; raises ContextOverflow
    (after recording it) when they cannot."""
    cfg, backend = config(proc), ctx.backend
    counter = counter_for(backend, tools)
    last = prior(proc)
    reserve = 0
    note_for = None
    if cfg.policy == "summarize":
        reserve = cfg.summary_tokens + 24
        note_for = lambda _d, _n: SUMMARY_NOTE  # noqa: E731 - the summary is written after
    elif cfg.policy == "page":
        reserve = int(room * cfg.page_tokens) if cfg.page_in else 0
    elif proc.program.summarize:
        note_for = lambda d, _n: memory.summarize(d)  # noqa: E731 - the extractive note
    try:
        out, c = memory.compact(
            msgs, counter, room, cfg, prior=last, reserve=reserve, note_for=note_for
        )
        if c is None:
            return out
        if cfg.policy == "summarize" and not c.reused:
            out = await _summarize(proc, ctx, msgs, c, last, counter, room)
        elif cfg.policy == "page":
            out = _page(proc, ctx, msgs, c, counter, room)
    except ContextOverflow as exc:
        journal.append(
            ctx.store,
            proc,
            Compaction(cfg.policy, room, counter.total(msgs), 0, overflow=str(exc)),
        )
        raise
    journal.append(ctx.store, proc, c)
    return out


def bounded_chunks(lines: list[str], counter: Counter, budget: int) -> list[str]:
    """Lines grouped into chunks of at most `budget` tokens; a line longer than that is cut
    (marked), so the summarizer's input is bounded whatever the conversation holds."""
    chunks, cur, n = [], [], 0
    for line in lines:
        k = counter.one({"role": "user", "content": line})
        if k > budget:
            keep = max(1, int(len(line) * budget / k * 0.8))
            line, k = line[:keep] + " [...cut]", budget
        if cur and n + k > budget:
            chunks.append("\n".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += k
    if cur:
        chunks.append("\n".join(cur))
    return chunks


async def _summarize(
    proc: Process,
    ctx: Any,
    msgs: list[Message],
    c: Compaction,
    last: Compaction | None,
    counter: Counter,
    room: int,
) -> list[Message]:
    cfg, backend = config(proc), ctx.backend
    body = msgs[2:]
    start = last.cut if last is not None and last.cut <= c.cut else 0
    summary = last.note[len(SUMMARY_NOTE) :] if last and last.note.startswith(SUMMARY_NOTE) else ""
    if start == 0:
        summary = ""
    lines = [
        f"{m['role']}: {m.get('content') or m.get('raw') or ''}"
        + "".join(
            f" [called {t['function']['name']}({t['function']['arguments']})]"
            for t in m.get("tool_calls", [])
        )
        for m in body[start : c.cut]
    ]
    window = backend.context_window or room
    instr = counter.total([{"role": "system", "content": SUMMARIZER}]) + 32
    budget = window - cfg.summary_tokens - instr - cfg.summary_tokens - 16
    for chunk in bounded_chunks(lines, counter, max(64, budget)):
        user = (f"Summary so far:\n{summary}\n\n" if summary else "") + f"New messages:\n{chunk}"
        request = ChatRequest(
            [{"role": "system", "content": SUMMARIZER}, {"role": "user", "content": user}],
            sampling={"temperature": 0.0, "max_tokens": cfg.summary_tokens},
            priority=proc.priority,
            user=proc.owner,
            request_id=f"p{proc.pid}-s{len(proc.steps)}-summary",
        )
        result = await backend.chat(request)
        u = result.usage
        turn = SummaryTurn(
            result.content,
            result.raw,
            u.prompt_tokens,
            u.cached_tokens,
            u.completion_tokens,
            result.engine_seconds,
            ctx.meter.price_for(backend, result).cost(result),
            result.finish_reason,
            result.backend or backend.name,
        )
        journal.append(ctx.store, proc, turn, model=turn.backend)  # step and usage row
        c.summary_prompt_tokens += u.prompt_tokens
        c.summary_completion_tokens += u.completion_tokens
        summary = (result.content or result.raw or "").strip() or summary
    c.summarized = c.cut - start
    c.note = SUMMARY_NOTE + summary
    out = memory.build(msgs, c)
    c.tokens_after = counter.total(out)
    if c.tokens_after > room:  # longer than its reserve: the count's note instead
        c.note = memory.drop_note(c.cut, "trim")
        out = memory.build(msgs, c)
        c.tokens_after = counter.total(out)
    return out


def _page(
    proc: Process, ctx: Any, msgs: list[Message], c: Compaction, counter: Counter, room: int
) -> list[Message]:
    query = " ".join(_text(m) for m in [msgs[1], msgs[-1]])
    return page(ctx.store, proc.pid, msgs, c, counter, room, config(proc), query)


def page(
    store: Store,
    pid: int,
    msgs: list[Message],
    c: Compaction,
    counter: Counter,
    room: int,
    cfg: MemoryConfig,
    query: str,
    pinned: int = 2,
) -> list[Message]:
    """Index what left the window (dropped or elided) in recall memory, then page in the best
    hits for `query` near the end of the prompt (the front stays byte-identical)."""
    body = msgs[pinned:]
    have = memory_store.recall_refs(store, pid)
    gone = [*range(c.cut), *c.elided]
    new = [(str(i), body[i]["role"], _text(body[i])) for i in gone if str(i) not in have]
    if new:
        memory_store.recall_add(store, pid, new)
    out = memory.build(msgs, c, pinned)
    if not cfg.page_in or not body:
        return out
    budget = int(room * cfg.page_tokens)
    hits = memory_store.recall_search(store, pid, query, cfg.page_in, words=PAGED_WORDS)
    hits.sort(key=lambda h: int(h.ref) if h.ref.isdigit() else 0)  # in the order they were said
    lines, used = [], counter.one({"role": "user", "content": PAGED_NOTE})
    for h in hits:
        line = f"[{h.role}, message {h.ref}] {h.content[:1500]}"
        n = counter.one({"role": "user", "content": line})
        if used + n > budget:
            continue
        lines.append(line)
        used += n
        c.paged_in.append(h.ref)
    if not lines:
        return out
    paged = {"role": "user", "content": PAGED_NOTE + "\n".join(lines)}
    trial = memory.build(msgs, c, pinned, paged=paged)
    n = counter.total(trial)
    if n <= room:
        c.tokens_after = n
        return trial
    c.paged_in = []
    return out


def _text(m: Message) -> str:
    calls = "".join(
        f" {t['function']['name']}({t['function']['arguments']})" for t in m.get("tool_calls", [])
    )
    return (m.get("content") or m.get("raw") or "") + calls
