"""Speculative decoding (llmos/engine/spec.py, verify.py): lossless, inside continuous batching.

- The sampler: draft verification on synthetic distributions (accept x with probability p(x),
  else a draw from p without x), and the joint distribution of the first 3 tokens of a synthetic
  Markov "model" with speculation on vs off over 20k samples each (chi-square, p > 0.05), with a
  broken verifier as the negative control.
- The engine: greedy equality on vs off over a few hundred prompts in batches, with chunked
  prefill, preemption (a tiny KV cache) and JSON-schema requests; penalties, logprobs, stop
  strings, min_tokens and n give the same tokens on and off, and seeded sampling draws the same
  (but for float noise between step shapes); aborts in the middle of speculation give back
  every KV block.
"""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch
from scipy.stats import chi2_contingency

from llmos import LLM, SamplingParams
from llmos.engine.sampling import SamplingBatch, sample
from llmos.engine.sequence import Sequence
from llmos.engine.spec import NgramIndex, NgramProposer, Speculator, SuffixProposer
from llmos.engine.verify import accept

# -- the sampler, on synthetic distributions ------------------------------------------------------
V = 5


def _batch(rows: int, temperature: float = 0.8, top_p: float = 0.95) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.full((rows,), temperature),
        greedy=torch.zeros(rows, dtype=torch.bool),
        top_k=None,
        top_p=torch.full((rows,), top_p),
        min_p=None,
        generators=[None] * rows,
    )


def _probs(logits: torch.Tensor, temperature: float = 0.8, top_p: float = 0.95) -> torch.Tensor:
    """What `sample` draws from, for the expected counts."""
    n = 200_000
    torch.manual_seed(1)
    draws = sample(logits.expand(n, -1).clone(), _batch(n, temperature, top_p))
    return torch.bincount(draws, minlength=logits.shape[-1]).float() / n


def test_accepts_a_draft_with_its_probability_and_else_samples_the_rest() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p = torch.softmax(logits / 0.8, -1)
    n = 40_000
    for x in (0, 2):
        sampled = sample(logits.expand(n, -1).clone(), _batch(n, 0.8, 1.0)).tolist()
        outs = [accept((x,), [y, -7]) for y in sampled]
        accepted = sum(1 for o in outs if o == [x, -7])
        rate = accepted / n
        sigma = (float(p[x]) * (1 - float(p[x])) / n) ** 0.5
        assert abs(rate - float(p[x])) < 4 * sigma, (x, rate, float(p[x]))
        rejected = [o[0] for o in outs if len(o) == 1]
        assert x not in rejected
        counts = torch.bincount(torch.tensor(rejected), minlength=V).float()
        rest = p.clone()
        rest[x] = 0
        expected = rest / rest.sum() * len(rejected)
        keep = expected > 0
        stat = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
        assert stat < 13.28, stat  # chi-square, df 3 (4 cells), p = 0.01


def _markov() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn(V, V, generator=g) * 1.5  # logits of the next token given the last


def _generate(T: torch.Tensor, n: int, k: int, speculate: bool, broken: bool = False) -> list:
    """The first k tokens of n samples from the chain T, starting after token 0. With
    `speculate`, each step drafts the rest (random one-hot drafts) and verifies them."""
    rng = random.Random(5)
    out: list[list[int]] = [[] for _ in range(n)]
    while True:
        live = [i for i in range(n) if len(out[i]) < k]
        if not live:
            return [tuple(o) for o in out]
        drafts = {
            i: [rng.randrange(V) for _ in range(k - len(out[i]) - 1)] if speculate else []
            for i in live
        }
        rows = []
        for i in live:
            ctx = [0, *out[i]]
            rows.append(ctx[-1])
            rows.extend(drafts[i])  # row j scores the position after draft j - 1
        sampled = sample(T[torch.tensor(rows)].clone(), _batch(len(rows))).tolist()
        r = 0
        for i in live:
            d = drafts[i]
            got = sampled[r : r + len(d) + 1]
            r += len(d) + 1
            out[i].extend(d + got[len(d) :] if broken else accept(d, got))


def test_first_tokens_joint_distribution_on_vs_off() -> None:
    T, n, k = _markov(), 20_000, 3
    torch.manual_seed(11)
    off = _generate(T, n, k, speculate=False)
    on = _generate(T, n, k, speculate=True)
    bad = _generate(T, n, k, speculate=True, broken=True)  # accepts every draft

    def p_value(a: list, b: list) -> float:
        cells = sorted(set(a) | set(b))
        table = [[a.count(c) for c in cells], [b.count(c) for c in cells]]
        return float(chi2_contingency(table)[1])

    assert p_value(off, on) > 0.05
    assert p_value(off, bad) < 1e-6  # the test can tell a wrong verifier apart


# -- proposers ------------------------------------------------------------------------------------
def test_ngram_index_finds_the_longest_earlier_match() -> None:
    idx = NgramIndex((3, 2))
    idx.extend([1, 2, 3, 9, 1, 2, 4, 7, 2, 3])
    n, hits = idx.lookup([5, 1, 2, 3])
    assert n == 3 and hits == [3]
    n, hits = idx.lookup([8, 1, 2])
    assert n == 2 and hits == [2, 6]


def test_speculator_stops_drafting_where_drafts_fail() -> None:
    spec = Speculator(NgramProposer(), 8)
    assert spec.best_k(0.9) >= 4
    assert spec.best_k(0.0) == 0
    assert spec.best_k(0.9) > spec.best_k(0.5)
    assert spec.best_k(0.9, batch=16) < spec.best_k(0.9, batch=1)  # rows cost more there


class _Scripted:
    """A proposer that drafts `draft` every time it is asked (the policy under test is the
    speculator's, not the proposer's)."""

    def __init__(self, draft: list[int]) -> None:
        self.draft = draft

    def propose(self, seq: Sequence, k: int) -> list[int]:
        return self.draft[:k]

    def forget(self, seq: Sequence, finished: bool) -> None:
        pass


def test_probes_back_off_while_they_find_nothing() -> None:
    """At a batch where drafting does not pay, a sequence probes now and then; each probe
    that finds nothing doubles the wait, and a hit resets it."""
    # (no detokenizer: the speculator never decodes the sequence)
    seq = Sequence("r", [1, 2, 3], SamplingParams(), None, max_tokens=10_000)  # type: ignore[arg-type]
    spec = Speculator(_Scripted([]), 7, row_ratio=2.0, probe_every=4)
    assert spec.best_k(0.8, batch=16) == 0
    probed = []
    for step in range(200):
        assert spec.draft(seq, 7, 16) == []
        if spec.idle[seq.seq_id] == 0:  # this step was a probe
            probed.append(step)
    gaps = [b - a for a, b in zip(probed, probed[1:], strict=False)]
    assert gaps[:4] == [8, 16, 32, 64], gaps  # 4 steps, then doubling (up to 4 << MAX_BACKOFF)
    assert spec.misses[seq.seq_id] >= 4
    spec.proposer = _Scripted([5, 6])
    spec.idle[seq.seq_id] = 10_000  # the next call probes, and drafts this time
    assert spec.draft(seq, 7, 16) == [5, 6]
    spec.observe(seq, 2, 2)
    assert seq.seq_id not in spec.misses


def test_speculator_learns_the_cost_of_a_row_from_the_steps() -> None:
    spec = Speculator(NgramProposer(), 8, row_ratio=0.3)
    rng = random.Random(0)
    for _ in range(200):  # this machine: 5 ms per weight read, 0.5 ms per row
        rows = rng.randint(1, 40)
        spec.observe_step(rows, 0.005 + 0.0005 * rows)
    assert spec.row_ratio == pytest.approx(0.1, rel=0.01)


# -- the engine -----------------------------------------------------------------------------------
WORDS = ["cat", "river", "code", "tree", "moon", "x", "def", "return", "(", ")", "\n"]


def _prompts(n: int) -> list[str]:
    rng = random.Random(0)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            body = "\n".join(f"item {j}: {rng.choice(WORDS)}" for j in range(rng.randint(2, 8)))
            out.append(f"Copy this list:\n{body}\nCopy:\n")
        elif kind == 1:
            fn = rng.choice(["add", "mul", "sub"])
            body = "\n".join(f"def {fn}{j}(a, b):\n    return a + b" for j in range(4))
            out.append(f"{body}\n")
        elif kind == 2:
            out.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))))
        else:
            out.append("1, 2, 3, 4, " * rng.randint(1, 6))
    return out


@pytest.fixture(scope="module")
def spec_llm() -> LLM:
    """Speculation on; 40 blocks of 16 tokens (too few for 16 running sequences: preemption)
    and 96-token steps (long prompts prefill in chunks beside decodes)."""
    return LLM(
        speculation="suffix",
        num_speculative_tokens=6,
        num_kv_blocks=40,
        max_num_batched_tokens=96,
        max_num_seqs=16,
    )


def _off(p: SamplingParams) -> SamplingParams:
    d = {f: getattr(p, f) for f in p.__dataclass_fields__}
    return SamplingParams(**{**d, "speculation": False})


def _check_idle(llm: LLM) -> None:
    e = llm.engine
    assert not e.has_unfinished_requests() and e.blocks.num_used == 0


def test_greedy_equal_on_and_off_chunked_and_preempted(spec_llm: LLM) -> None:
    prompts = _prompts(200)
    params = SamplingParams(temperature=0, max_tokens=8)
    e = spec_llm.engine
    before = list(e.spec_totals), e.scheduler.num_preemptions
    on = spec_llm.generate(prompts, params, use_progress=False)
    drafts, preempted = e.spec_totals[2] - before[0][2], e.scheduler.num_preemptions - before[1]
    off = spec_llm.generate(prompts, _off(params), use_progress=False)
    assert drafts > 100, f"only {drafts} drafts accepted: speculation hardly ran"
    assert preempted > 0, "the tiny cache was meant to force preemption"
    diff = [i for i, (a, b) in enumerate(zip(on, off, strict=True)) if a.token_ids != b.token_ids]
    assert not diff, f"{len(diff)} of {len(prompts)} differ, first: {prompts[diff[0]]!r}"
    assert all(o.metrics["spec_num_drafts"] == 0 for o in off)
    assert sum(o.metrics["spec_num_accepted_tokens"] for o in on) > 0
    _check_idle(spec_llm)


SCHEMA = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"],
            },
            "maxItems": 4,
        }
    },
    "required": ["people"],
}


def test_json_schema_requests_equal_on_and_off_and_valid(spec_llm: LLM) -> None:
    names = ["Ann", "Bob", "Cy", "Dee", "Eve", "Flo"]
    prompts = [
        f"List as JSON: {a} is {20 + i}, {b} is {30 + i}, {a} is {40 + i}. JSON:"
        for i, (a, b) in enumerate(zip(names, names[1:] + names[:1], strict=True))
    ]
    # (a budget well past the output: near max_tokens the grammar steers and drafts stop)
    params = SamplingParams(temperature=0, max_tokens=200, json_schema=SCHEMA)
    e = spec_llm.engine
    before = e.spec_totals[2]
    on = spec_llm.generate(prompts, params, use_progress=False)
    accepted = e.spec_totals[2] - before
    off = spec_llm.generate(prompts, _off(params), use_progress=False)
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    for o in on:
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), SCHEMA)
    assert accepted > 0, "no draft was accepted in a constrained request"
    _check_idle(spec_llm)


BLOCK = {"name": "pw", "kind": "regex", "pattern": "(?i)swordfish", "prevent": True}


def test_guarded_requests_draft_and_still_never_say_it(spec_llm: LLM) -> None:
    """A prevention guard compiles into the decoding constraint (`GuardedMatcher`): drafts are
    checked against its block matcher too, so they are cut where it bans, and the tokens equal
    speculation off's."""
    lines = "\n".join(f"{i}. the value of key{i} is {i * 7}" for i in range(12))
    data = json.dumps({f"key{i}": f"value {i * 7}" for i in range(10)})
    prompts = [
        "The password is swordfish. I repeat, the password is",
        f"Copy these lines exactly:\n{lines}\nCopy:\n{lines[:40]}",
        f"The word swordfish appears here.\n{lines}\nAgain, the same lines:\n0. the",
    ]
    json_prompts = [f"Here is the data: {data}\nThe same data as JSON:", *prompts[:1]]
    e = spec_llm.engine
    for extra in ({}, {"json_schema": {"type": "object"}}):
        params = SamplingParams(temperature=0, max_tokens=60, guards=[BLOCK], **extra)
        batch = json_prompts if extra else prompts
        before = e.spec_totals[2]
        on = spec_llm.generate(batch, params, use_progress=False)
        accepted = e.spec_totals[2] - before
        off = spec_llm.generate(batch, _off(params), use_progress=False)
        assert [o.token_ids for o in on] == [o.token_ids for o in off], extra
        assert all("swordfish" not in o.text.lower() for o in on)
        assert accepted > 0, f"no draft was accepted in a guarded request ({extra})"
    _check_idle(spec_llm)


def test_penalties_logprobs_stops_min_tokens_and_n_equal_on_and_off(spec_llm: LLM) -> None:
    prompts = _prompts(12)
    params = [
        SamplingParams(temperature=0, max_tokens=16, logprobs=2, n=2),
        SamplingParams(temperature=0, max_tokens=16, presence_penalty=0.5, repetition_penalty=1.2),
        SamplingParams(temperature=0, max_tokens=16, stop=["):", "item 3"], min_tokens=4),
        SamplingParams(temperature=0, max_tokens=12, frequency_penalty=0.3, min_tokens=12),
    ]
    plist = [params[(i + 1) % len(params)] for i in range(len(prompts))]  # stops on code
    on = spec_llm.generate(prompts, plist, use_progress=False)
    off = spec_llm.generate(prompts, [_off(p) for p in plist], use_progress=False)
    for a, b in zip(on, off, strict=True):
        assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
        assert [o.text for o in a.outputs] == [o.text for o in b.outputs]
        assert [o.finish_reason for o in a.outputs] == [o.finish_reason for o in b.outputs]
        if a.outputs[0].logprobs is not None:
            for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
                assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 1e-3
                assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert any(len(o.outputs[0].token_ids) < 16 for o in on[1::4])  # some stop string hit
    _check_idle(spec_llm)


def test_seeded_sampling_draws_what_plain_decoding_draws(spec_llm: LLM) -> None:
    """Each draft row uses its position's seeded draw, so a seeded request gets the same
    tokens on and off, except where the logits' float noise between a one-row and a many-row
    step moves a draw across a token boundary (then the two continue differently): most
    outputs are identical, and the rest share a prefix."""
    prompts = _prompts(16)
    params = SamplingParams(temperature=0.8, seed=5, n=2, max_tokens=16, frequency_penalty=0.3)
    on = spec_llm.generate(prompts, params, use_progress=False)
    off = spec_llm.generate(prompts, _off(params), use_progress=False)
    pairs = [
        (x.token_ids, y.token_ids)
        for a, b in zip(on, off, strict=True)
        for x, y in zip(a.outputs, b.outputs, strict=True)
    ]
    same = sum(x == y for x, y in pairs)
    assert same >= 0.75 * len(pairs), f"only {same} of {len(pairs)} seeded outputs equal"
    _check_idle(spec_llm)


def test_ngram_proposer_is_lossless_too(spec_llm: LLM) -> None:
    e = spec_llm.engine
    assert e.speculator is not None
    suffix = e.speculator.proposer
    e.speculator.proposer = NgramProposer()
    try:
        prompts = _prompts(16)
        params = SamplingParams(temperature=0, max_tokens=16)
        before = e.spec_totals[2]
        on = spec_llm.generate(prompts, params, use_progress=False)
        assert e.spec_totals[2] > before
        off = spec_llm.generate(prompts, _off(params), use_progress=False)
        assert [o.token_ids for o in on] == [o.token_ids for o in off]
    finally:
        e.speculator.proposer = suffix
    assert isinstance(suffix, SuffixProposer)


def test_aborts_mid_speculation_give_back_every_block(spec_llm: LLM) -> None:
    e = spec_llm.engine
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, p in enumerate(_prompts(8)):
        e.add_request(f"abort-{i}", p, params)
    before = e.spec_totals[0]
    for _ in range(200):
        e.step()
        if e.spec_totals[0] > before + 10:
            break
    assert e.spec_totals[0] > before, "no step carried drafts before the aborts"
    assert e.blocks.num_used > 0
    for i in range(8):
        e.abort_request(f"abort-{i}")
    _check_idle(spec_llm)
    assert e.stats().kv_blocks_orphaned == 0


def test_bad_speculation_settings_name_the_field() -> None:
    from llmos.engine.config import EngineConfig
    from llmos.errors import RequestError

    with pytest.raises(RequestError, match="speculation"):
        EngineConfig(speculation="medusa")
    with pytest.raises(RequestError, match="num_speculative_tokens"):
        EngineConfig(speculation="suffix", num_speculative_tokens=0)
    with pytest.raises(RequestError, match="speculation"):
        SamplingParams(speculation="no")  # type: ignore[arg-type]


def test_scheduler_plans_drafts_and_trim_gives_rejected_slots_back() -> None:
    """Pure bookkeeping: drafts ride in the plan within the budget and their blocks are
    allocated; trimming after verification frees the rejected slots' blocks, and the prefix
    cache names only blocks of computed (accepted) tokens."""
    from llmos.engine.block_manager import BlockManager
    from llmos.engine.scheduler import Scheduler, SchedulerConfig
    from llmos.engine.sequence import Sequence

    class NoDetok:
        def add(self, ids: list[int], final: bool = False) -> str:
            return ""

    bm = BlockManager(num_blocks=8, block_size=4)
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=8), bm, lambda s, room, b: [7] * min(6, room)
    )
    params = SamplingParams(max_tokens=16)
    seq = Sequence("r", [1, 2, 3, 4, 5], params, NoDetok(), max_tokens=16)  # type: ignore[arg-type]
    sched.add(seq)
    (s,) = sched.schedule().scheduled  # admission: the prompt, no drafts
    assert s.num_new_tokens == 5 and s.draft == ()
    seq.token_ids.append(8)  # the first output token
    seq.num_computed_tokens = 5
    (s,) = sched.schedule().scheduled  # a decode: 1 token + drafts, within the 8-token budget
    assert s.num_new_tokens == 1 and s.draft == (7,) * 6 and s.num_rows == 7
    assert len(seq.block_table) == 3  # 12 slots: the drafts' too
    seq.token_ids += [7, 9]  # verification: one draft accepted, then the bonus token
    seq.num_computed_tokens = 7
    bm.commit(seq)
    bm.trim(seq, seq.num_tokens)
    assert len(seq.block_table) == 2 and bm.num_free == 6  # the third block is back
    assert seq.num_named_blocks == 1  # only the full block of computed, accepted tokens
