"""Multiple-choice cases scored by log-likelihood, lm-eval's `loglikelihood`: each choice's
score is the sum of the prompt log-probabilities of the tokens that `context + choice` adds
after the context's own tokens, and the highest-scoring choice is the output.

On a local provider the engine gives the prompt log-probabilities itself; on an http provider
the server's `/v1/completions` does, with `echo` and `logprobs` (as lm-eval's
`local-completions` asks llmos serve or vLLM). Over http the prompts go as token ids from the
server's own `/tokenize`, so both sides split `context + choice` at the same token; a server
without `/tokenize` gets the texts and the split falls where the echoed tokens' text offsets
pass the context."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from llmos.backends.base import ChatResult, Usage
from llmos.evals.suite import Case, Cell, SuiteError

Scored = tuple[float, int, float]  # (log-likelihood, prompt tokens, engine seconds)


def split_at(ctx_ids: list[int], ids: list[int]) -> int:
    """The first token of `ids` (context + choice) that is not the context's: after their
    common prefix, never 0 (the first token has no log-probability)."""
    n = 0
    while n < min(len(ctx_ids), len(ids)) and ctx_ids[n] == ids[n]:
        n += 1
    return max(n, 1)


async def local_logprob(backend: Any, context: str, choice: str) -> Scored:
    from llmos import SamplingParams

    tok = backend.engine.tokenizer
    ctx_ids, ids = tok.encode(context), tok.encode(context + choice)
    n = split_at(ctx_ids, ids)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    final = None
    async for out in backend.engine.generate(ids, params):
        final = out
    assert final is not None and final.prompt_logprobs is not None
    total = sum(final.prompt_logprobs[i][ids[i]] for i in range(n, len(ids)))
    return total, len(ids), final.metrics.get("engine_seconds", 0.0)


def _root(backend: Any) -> str:
    """The server's root: vLLM and llmos serve `/tokenize` beside `/v1`, not under it."""
    return str(backend.client.base_url).rstrip("/").removesuffix("/v1")


async def _tokenize(http: httpx.AsyncClient, backend: Any, texts: list[str]) -> list[list[int]]:
    """Token ids from the server's `/tokenize` (vLLM's shape), or [] when it has none."""
    out = []
    for text in texts:
        r = await http.post(
            f"{_root(backend)}/tokenize", json={"model": backend.model, "prompt": text}
        )
        if r.status_code in (404, 405):
            return []
        r.raise_for_status()
        out.append(list(r.json()["tokens"]))
    return out


async def http_logprobs(backend: Any, context: str, choices: list[str]) -> list[Scored]:
    """Every choice of one case in one `/v1/completions` request (a batch of prompts)."""
    texts = [context + c for c in choices]
    headers = {"Authorization": f"Bearer {backend.client.api_key}"}
    async with httpx.AsyncClient(timeout=backend.client.timeout, headers=headers) as http:
        ids = await _tokenize(http, backend, [context, *texts])
    prompts: list[Any] = ids[1:] if ids else texts
    r = await backend.client.completions.create(
        model=backend.model, prompt=prompts, max_tokens=1, temperature=0.0, echo=True,
        logprobs=1,
    )  # fmt: skip
    scored: list[Scored] = []
    for i, choice in enumerate(sorted(r.choices, key=lambda c: c.index)):
        lp = choice.logprobs
        if lp is None or lp.token_logprobs is None:
            raise SuiteError(f"{backend.name}: the server sent no echoed prompt logprobs")
        if ids:
            start, end = split_at(ids[0], ids[i + 1]), len(ids[i + 1])
        else:  # the first echoed token that reaches past the context, then the choice's
            spans = list(zip(lp.text_offset or [], lp.tokens or [], strict=True))
            end = sum(at < len(texts[i]) for at, _ in spans)  # the prompt's tokens
            start = max(1, next(j for j, (at, t) in enumerate(spans)
                                if at + len(t) > len(context)))  # fmt: skip
        values = lp.token_logprobs[start:end]
        if any(v is None for v in values):
            raise SuiteError(f"{backend.name}: a choice's token has no logprob")
        scored.append((float(sum(values)), end, 0.0))
    return scored


async def run_choices(backend: Any, cell: Cell, case: Case, context: str) -> Any:
    """The case's output is its likeliest choice; the transcript lists every choice's score."""
    from llmos.evals.providers import Output, price

    assert case.choices is not None
    start = time.perf_counter()
    if cell.kind == "local":
        scored = await asyncio.gather(*(local_logprob(backend, context, c) for c in case.choices))
    elif cell.kind == "openai_http":
        scored = await http_logprobs(backend, context, case.choices)
    else:
        raise SuiteError(
            f"tests {case.id}: choices are scored by log-likelihood on a local or openai_http "
            f"provider, not {cell.kind}"
        )
    elapsed = time.perf_counter() - start
    best = max(range(len(scored)), key=lambda i: scored[i][0])
    result = ChatResult(None, [], Usage(sum(s[1] for s in scored)), sum(s[2] for s in scored))
    transcript = [{"choice": c, "logprob": s[0]} for c, s in zip(case.choices, scored, strict=True)]
    return Output(case.choices[best], result.usage.prompt_tokens, 0, price(cell.kind, result),
                  elapsed, transcript=transcript)  # fmt: skip
