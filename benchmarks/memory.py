"""Memory: how much of what a long conversation said is still in the prompt a policy builds.

A seeded generator writes ~200 multi-session conversations (20-60k tokens of the real
tokenizer) holding facts about people, later updates to some of them, distractors (the same
attributes of other people, filler prose) and, at the end, questions whose evidence has long
left a 2k/4k/8k window; some have no answer (the model should say "unknown").

Reported, in one run:
- evidence recall (model-independent): the share of answerable questions whose evidence (the
  message with the latest value) is in the prompt each policy builds: naive last-N
  truncation, LangChain's `trim_messages(strategy="last")`, llmos trim, llmos page;
- latest-value share: of the prompts for updated facts, those that hold the latest value;
- end-to-end accuracy with SmolLM2-135M per policy on a small sample (`--e2e N`), and the
  share of updated facts answered with the latest value; summarize on `--e2e-summarize N`;
- the cost of fitting: `compact` time per call at an 8k window (a growing conversation, the
  per-message counts cached as the kernel does), and the prefix-cache share of prompt tokens
  on the turn after a compaction, from the engine, against naive last-N on the same turns.

    .venv/bin/python benchmarks/memory.py [--conversations 200] [--e2e 8] [--e2e-summarize 2]
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORPUS  # noqa: E402

from llmos import LLM, SamplingParams  # noqa: E402
from llmos.kernel.memory import Compaction, Counter, build, compact  # noqa: E402
from llmos.kernel.memory_config import MemoryConfig  # noqa: E402
from llmos.kernel.memory_policies import PAGED_NOTE, page  # noqa: E402
from llmos.kernel.store import Store  # noqa: E402

Message = dict[str, Any]
SYSTEM = (
    "You are a personal assistant with a long memory of your conversations with the user. "
    "Answer the last question in a few words, from what the user told you. If the "
    "conversation never said, answer exactly: unknown."
)
NAMES = (
    "Alice Bruno Chen Dara Emeka Farah Goran Hana Ivan Jade Kofi Lena Mateo Nadia Omar Priya "
    "Quinn Rosa Sven Tara Umar Vera Wen Xavier Yara Zane"
).split()
CITIES = "Lyon Porto Oslo Quito Lagos Hanoi Perth Tunis Cusco Riga Turin Davao Malmo".split()
JOBS = "nurse pilot baker lawyer welder chemist plumber teacher farmer dentist".split()
PETS = "Biscuit Pepper Mango Ziggy Noodle Pickle Waffle Juniper Tofu Clover".split()
# attribute -> (statement, update, question)
ATTRS = {
    "city": (
        "By the way, my friend {n} lives in {v}.",
        "News about {n}: {n} moved away and now lives in {v}.",
        "Which city does {n} live in now?",
        CITIES,
    ),
    "job": (
        "Something I should mention: {n} works as a {v}.",
        "{n} changed careers and now works as a {v}.",
        "What is {n}'s job now?",
        JOBS,
    ),
    "pet": (
        "Oh, and {n} has a cat called {v}.",
        "{n} renamed the cat, it is now called {v}.",
        "What is the name of {n}'s cat now?",
        PETS,
    ),
    "code": (
        "Please remember that {n}'s locker code is {v}.",
        "{n}'s locker code was changed to {v}.",
        "What is {n}'s locker code now?",
        [str(x) for x in range(1000, 9999, 7)],
    ),
}
REPLIES = ("Noted, thank you.", "Got it, I will remember that.", "Thanks for telling me.")


@dataclass(slots=True)
class Question:
    text: str
    answer: str | None  # None: unanswerable (abstain)
    evidence: int | None  # index of the message with the latest value
    stale: str | None = None  # the value before an update


@dataclass(slots=True)
class Conversation:
    messages: list[Message]
    questions: list[Question] = field(default_factory=list)


def generate(seed: int, n: int, tokens: Any) -> list[Conversation]:
    """`n` conversations of 20-60k tokens (`tokens(text)` counts them)."""
    out = []
    for k in range(n):
        rng = random.Random(seed * 100_003 + k)
        target = rng.randint(20_000, 60_000)
        people = rng.sample(NAMES, 10)
        facts: dict[tuple[str, str], tuple[str, int, str | None]] = {}
        msgs: list[Message] = [{"role": "system", "content": SYSTEM}]
        total, session = 0, 0
        while total < target:
            if rng.random() < 0.08 or session == 0:
                session += 1
                msgs.append({"role": "user", "content": f"(Session {session} begins.)"})
                msgs.append({"role": "assistant", "content": "Welcome back."})
            parts = [rng.choice(CORPUS) for _ in range(rng.randint(1, 3))]
            if rng.random() < 0.5:  # a fact, or an update of one
                who, attr = rng.choice(people), rng.choice(list(ATTRS))
                say, update, _q, values = ATTRS[attr]
                old = facts.get((who, attr))
                v = rng.choice([x for x in values if not old or x != old[0]])
                text = (update if old else say).format(n=who, v=v)
                parts.insert(rng.randint(0, len(parts)), text)
                facts[(who, attr)] = (v, len(msgs), old[0] if old else None)
            user = " ".join(parts)
            reply = rng.choice(REPLIES) + " " + rng.choice(CORPUS)
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            total += tokens(user) + tokens(reply) + 10
        conv = Conversation(msgs)
        updated = [key for key, f in facts.items() if f[2] is not None]
        plain = [key for key, f in facts.items() if f[2] is None and f[1] < len(msgs) * 0.6]
        picks = rng.sample(updated, min(2, len(updated))) + rng.sample(plain, min(1, len(plain)))
        for who, attr in picks:
            v, at, stale = facts[(who, attr)]
            conv.questions.append(Question(ATTRS[attr][2].format(n=who), v, at, stale))
        unknown = [(p, a) for p in people for a in ATTRS if (p, a) not in facts]
        if unknown:
            who, attr = rng.choice(unknown)
            conv.questions.append(Question(ATTRS[attr][2].format(n=who), None, None))
        out.append(conv)
    return out


# -- the policies --------------------------------------------------------------------------------
@dataclass(slots=True)
class Built:
    messages: list[Message]
    kept: set[int]  # conversation message indices whose content is in the prompt
    extra: str = ""  # paged-in text, a summary
    seconds: float = 0.0


def naive_last_n(msgs: list[Message], counter: Counter, room: int) -> Built:
    """The system prompt plus as many of the newest messages as fit."""
    used = counter.total(msgs[:1])
    i = len(msgs)
    while i > 1 and used + counter.one(msgs[i - 1]) <= room:
        i -= 1
        used += counter.one(msgs[i])
    return Built(msgs[:1] + msgs[i:], set(range(i, len(msgs))) | {0})


def langchain_last(msgs: list[Message], counter: Counter, room: int) -> Built:
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        HumanMessage,
        SystemMessage,
        trim_messages,
    )

    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    lc = [kinds[m["role"]](content=m["content"], id=str(i)) for i, m in enumerate(msgs)]
    role = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}

    overhead = counter.total(msgs[:1]) - counter.one(msgs[0])  # the template's own tokens

    def tokens(m: BaseMessage) -> int:  # per message (the signature says so): LC sums them
        n = counter.one({"role": role[type(m)], "content": m.content})
        return n + (overhead if isinstance(m, SystemMessage) else 0)

    tokens.__annotations__ = {"m": BaseMessage, "return": int}  # a class, not a string

    kept = trim_messages(
        lc,
        strategy="last",
        token_counter=tokens,
        max_tokens=room,
        include_system=True,
        start_on="human",
    )
    out = [{"role": role[type(m)], "content": m.content} for m in kept]
    return Built(out, {int(m.id) for m in kept})


def llmos_fit(
    msgs: list[Message], counter: Counter, room: int, policy: str, store: Store, pid: int
) -> Built:
    cfg = MemoryConfig(policy=policy)
    reserve = int(room * cfg.page_tokens) if policy == "page" else 0
    t0 = time.perf_counter()
    out, c = compact(msgs, counter, room, cfg, pinned=1, reserve=reserve)
    extra = ""
    if c is not None and policy == "page":
        out = page(store, pid, msgs, c, counter, room, cfg, msgs[-1]["content"], pinned=1)
        extra = "\n".join(m["content"] for m in out if m["content"].startswith(PAGED_NOTE))
    seconds = time.perf_counter() - t0
    if c is None:
        return Built(out, set(range(len(msgs))), seconds=seconds)
    body = range(1, len(msgs))
    kept = {0} | {i for i in body if i - 1 >= c.cut and i - 1 not in set(c.elided)}
    return Built(out, kept, extra, seconds)


def has_evidence(b: Built, q: Question, msgs: list[Message]) -> bool:
    """The evidence message is kept whole, or a paged-in snippet of it holds the value."""
    assert q.evidence is not None and q.answer is not None
    if q.evidence in b.kept:
        return True
    for line in b.extra.splitlines():
        m = re.match(r"\[\w+, message (\d+)\] (.*)", line)
        if m and int(m.group(1)) + 1 == q.evidence and q.answer in m.group(2):
            return True
    return False


# -- the run -------------------------------------------------------------------------------------
def recall_table(convs: list[Conversation], counter: Counter, windows: list[int]) -> list[str]:
    store = Store(":memory:")
    rows = []
    for w in windows:
        room = w - 16 - 8
        hits: dict[str, list[bool]] = {}
        latest: dict[str, list[bool]] = {}
        fit_ms: list[float] = []
        over: dict[str, int] = {}
        for k, conv in enumerate(convs):
            for j, q in enumerate(conv.questions):
                if q.answer is None:
                    continue
                msgs = conv.messages + [{"role": "user", "content": q.text}]
                pid = (w * 1000 + k) * 10 + j
                built = {
                    "naive last-N": naive_last_n(msgs, counter, room),
                    "LangChain trim_messages(last)": langchain_last(msgs, counter, room),
                    "llmos trim": llmos_fit(msgs, counter, room, "trim", store, pid),
                    "llmos page": llmos_fit(msgs, counter, room, "page", store, pid),
                }
                fit_ms.append(built["llmos trim"].seconds * 1000)
                for name, b in built.items():
                    if counter.total(b.messages) > room:
                        over[name] = over.get(name, 0) + 1
                    ok = has_evidence(b, q, msgs)
                    hits.setdefault(name, []).append(ok)
                    if q.stale is not None:
                        latest.setdefault(name, []).append(ok)
        for name in hits:
            h, lt = hits[name], latest.get(name, [])
            rows.append(
                f"| {w} | {name} | {sum(h) / len(h):.1%} ({sum(h)}/{len(h)}) | "
                f"{sum(lt) / max(1, len(lt)):.1%} ({sum(lt)}/{len(lt)}) | {over.get(name, 0)} |"
            )
        print(
            f"window {w}: fit (trim, cold per-message cache) median "
            f"{statistics.median(fit_ms):.1f} ms",
            flush=True,
        )
    return rows


def correct(text: str, q: Question) -> bool:
    t = text.lower()
    if q.answer is None:
        return "unknown" in t or "not" in t or "never" in t
    return q.answer.lower() in t


def e2e(
    llm: LLM, convs: list[Conversation], counter: Counter, window: int, summarize_n: int
) -> list[str]:
    store = Store(":memory:")
    room = window - 16 - 8
    prompts: dict[str, list[tuple[list[Message], Question]]] = {}
    for k, conv in enumerate(convs):
        for j, q in enumerate(conv.questions):
            msgs = conv.messages + [{"role": "user", "content": q.text}]
            pid = 7_000_000 + k * 10 + j
            for name, b in (
                ("naive last-N", naive_last_n(msgs, counter, room)),
                ("LangChain trim_messages(last)", langchain_last(msgs, counter, room)),
                ("llmos trim", llmos_fit(msgs, counter, room, "trim", store, pid)),
                ("llmos page", llmos_fit(msgs, counter, room, "page", store, pid)),
            ):
                prompts.setdefault(name, []).append((b.messages, q))
    if summarize_n:
        for conv in convs[:summarize_n]:
            for q in conv.questions:
                msgs = conv.messages + [{"role": "user", "content": q.text}]
                prompts.setdefault("llmos summarize", []).append(
                    (summarized(llm, msgs, counter, room), q)
                )
    params = SamplingParams(temperature=0.0, max_tokens=16)
    rows = []
    for name, items in prompts.items():
        t0 = time.perf_counter()
        outs = llm.chat([m for m, _ in items], params, use_progress=False)
        right = [correct(o.outputs[0].text, q) for o, (_, q) in zip(outs, items, strict=True)]
        upd = [(o.outputs[0].text, q) for o, (_, q) in zip(outs, items, strict=True) if q.stale]
        latest = sum(q.answer.lower() in t.lower() for t, q in upd if q.answer)
        stale = sum(q.stale.lower() in t.lower() for t, q in upd if q.stale)
        rows.append(
            f"| {window} | {name} | {sum(right) / len(right):.1%} ({sum(right)}/{len(right)}) | "
            f"{latest}/{len(upd)} latest, {stale}/{len(upd)} stale | "
            f"{time.perf_counter() - t0:.0f} s |"
        )
        print(rows[-1], flush=True)
    return rows


def summarized(llm: LLM, msgs: list[Message], counter: Counter, room: int) -> list[Message]:
    """The summarize policy offline: the kernel's summarizer prompt over bounded chunks of
    what trimming drops, folded into one running summary by the same model."""
    from llmos.kernel.memory_policies import SUMMARIZER, SUMMARY_NOTE, bounded_chunks

    cfg = MemoryConfig(policy="summarize", summary_tokens=96)
    out, c = compact(msgs, counter, room, cfg, pinned=1, reserve=cfg.summary_tokens + 24)
    if c is None or not c.cut:
        return out
    lines = [f"{m['role']}: {m['content']}" for m in msgs[1 : 1 + c.cut]]
    budget = room - 2 * cfg.summary_tokens - counter.one({"role": "system", "content": SUMMARIZER})
    summary = ""
    params = SamplingParams(temperature=0.0, max_tokens=cfg.summary_tokens)
    for chunk in bounded_chunks(lines, counter, budget - 32):
        user = (f"Summary so far:\n{summary}\n\n" if summary else "") + f"New messages:\n{chunk}"
        ask = [{"role": "system", "content": SUMMARIZER}, {"role": "user", "content": user}]
        summary = llm.chat(ask, params, use_progress=False)[0].outputs[0].text.strip()
    c.note = SUMMARY_NOTE + summary
    return build(msgs, c, 1)


def fit_cost(conv: Conversation, counter: Counter) -> list[str]:
    """`compact` time per call at an 8k window, growing one conversation turn by turn (with
    the previous compaction as prior and the per-message counts cached, as the kernel runs)."""
    msgs = conv.messages
    times, fresh = [], []
    prior: Compaction | None = None
    for end in range(3, len(msgs) + 1, 2):
        t0 = time.perf_counter()
        _, c = compact(msgs[:end], counter, 8192 - 24, MemoryConfig(), prior=prior, pinned=1)
        ms = (time.perf_counter() - t0) * 1000
        if c is not None:
            (times if c.reused else fresh).append(ms)
        prior = c or prior
    rows = [
        f"| compact at 8k, reusing the last compaction | {len(times)} calls | median "
        f"{statistics.median(times):.2f} ms, p95 {sorted(times)[int(len(times) * 0.95)]:.2f} ms |",
        f"| compact at 8k, a fresh compaction | {len(fresh)} calls | median "
        f"{statistics.median(fresh):.2f} ms, max {max(fresh):.2f} ms |",
    ]
    return rows


def cache_share(llm: LLM, conv: Conversation, counter: Counter) -> list[str]:
    """The prefix-cache share of prompt tokens per turn, from the engine, growing one
    conversation at a 1k window: llmos trim vs naive last-N on the same turns."""
    msgs, rows = conv.messages, []
    window, turns = 1024, 20
    room = window - 1 - 8
    share: dict[str, list[tuple[bool, float]]] = {"llmos trim": [], "naive last-N": []}
    for name in share:
        prior, prev_cut = None, -1
        for end in range(3, min(len(msgs), 3 + 2 * turns), 2):
            convo = msgs[:end]
            if name == "llmos trim":
                out, c = compact(convo, counter, room, MemoryConfig(), prior=prior, pinned=1)
                compacted = c is not None and not c.reused
                prior = c or prior
            else:
                b = naive_last_n(convo, counter, room)
                out, cut = b.messages, min(b.kept - {0})
                compacted, prev_cut = cut != prev_cut and cut > 1, cut
            o = llm.chat(out, SamplingParams(max_tokens=1), use_progress=False)[0]
            share[name].append((compacted, o.num_cached_tokens / len(o.prompt_token_ids)))
    for name, xs in share.items():
        after = [s for (c0, _), (_, s) in zip(xs, xs[1:], strict=False) if c0]
        at = [s for c0, s in xs if c0]
        rows.append(
            f"| cache share, {name} ({window}-token window) | "
            f"{len(xs)} turns, {len(at)} compactions | "
            f"turn after a compaction {statistics.mean(after) if after else 0:.1%}; "
            f"the compaction turn {statistics.mean(at) if at else 0:.1%}; "
            f"all turns {statistics.mean(s for _, s in xs):.1%} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--windows", default="2048,4096,8192")
    ap.add_argument("--e2e", type=int, default=8, help="conversations for the model run")
    ap.add_argument("--e2e-window", type=int, default=2048)
    ap.add_argument("--e2e-summarize", type=int, default=0)
    ap.add_argument("--parts", default="fit,recall,cost,e2e")
    args = ap.parse_args()
    parts = args.parts.split(",")
    llm = None
    if {"cost", "e2e"} & set(parts):
        llm = LLM(model="smollm2-135m", max_model_len=max(2048, args.e2e_window))
        tok = llm.tokenizer
    else:  # the tokenizer alone
        from llmos.models.loader import load_checkpoint
        from llmos.models.registry import resolve

        tok = load_checkpoint(resolve("smollm2-135m")).tokenizer

    def count(msgs: list[Message], _tools: Any = None) -> int:
        return len(tok.encode_chat(msgs, add_generation_prompt=True))

    counter = Counter(count)
    t0 = time.perf_counter()
    convs = generate(args.seed, args.conversations, lambda s: int(len(s.split()) * 1.3))
    sizes = [counter.total(c.messages) for c in convs[:20]]
    nq = sum(len(c.questions) for c in convs)
    print(
        f"{len(convs)} conversations, {nq} questions, first 20: {min(sizes)}-{max(sizes)} "
        f"tokens ({time.perf_counter() - t0:.0f} s to generate and count)",
        flush=True,
    )
    if "fit" in parts:
        print("\n| cost | calls | figure |\n|---|---|---|")
        print("\n".join(fit_cost(convs[0], counter)), flush=True)
    if "recall" in parts:
        rows = recall_table(convs, counter, [int(w) for w in args.windows.split(",")])
        print("\n| window | policy | evidence recall | latest value in the prompt | over |")
        print("|---|---|---|---|---|")
        print("\n".join(rows), flush=True)
    if "cost" in parts:
        print("\n| cost | calls | figure |\n|---|---|---|")
        assert llm is not None
        print("\n".join(cache_share(llm, convs[0], counter)), flush=True)
    if "e2e" in parts and args.e2e:
        assert llm is not None
        print(f"\nend to end, SmolLM2-135M, {args.e2e} conversations x their questions:")
        print("| window | policy | accuracy | updated facts | time |\n|---|---|---|---|---|")
        e2e(llm, convs[: args.e2e], counter, args.e2e_window, args.e2e_summarize)


if __name__ == "__main__":
    main()
