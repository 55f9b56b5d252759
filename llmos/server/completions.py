"""`POST /v1/completions`: raw prompts (text or token ids, one or a batch), OpenAI's legacy API.

A batch of prompts becomes one engine request per prompt, run side by side; choice `i * n + j`
is prompt i's j-th output.
"""

from __future__ import annotations

import time
import uuid

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from llmos.engine.sequence import RequestOutput
from llmos.server import fields
from llmos.server.errors import APIError
from llmos.server.generation import Generation, PromptJob, collect
from llmos.server.logprobs import completion_logprobs
from llmos.server.protocol import Completion, CompletionChoice, CompletionRequest, Usage
from llmos.server.state import ServerState
from llmos.server.streaming import Deltas, event, sse_response, usage_of


def _jobs(state: ServerState, req: CompletionRequest) -> tuple[list[PromptJob], list[str]]:
    """One job per prompt, and each prompt's text (for `echo`)."""
    prompts = req.prompts()
    if len(prompts) > state.config.max_prompts:
        raise APIError(
            400,
            f"prompt: at most {state.config.max_prompts} prompts in one request, "
            f"got {len(prompts)}",
            param="prompt",
        )
    tokenizer = state.engine.tokenizer
    jobs, texts = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            state.check_text_fits(len(prompt), "prompt")
            ids, text = (tokenizer.encode(prompt) if prompt else []), prompt
        else:
            _check_ids(prompt, state.engine.engine.model_config.vocab_size)
            ids, text = prompt, (tokenizer.decode(prompt) if req.echo else "")
        # None: the engine gives the room left in the context and the KV cache
        params = req.sampling_params(
            max_tokens=req.max_tokens,
            logprobs=req.logprobs,
            prompt_logprobs=req.logprobs if req.echo else None,  # echo scores the prompt too
        )
        jobs.append(PromptJob(ids, params))
        texts.append(text)
    return jobs, texts


def _check_ids(ids: list[int], vocab: int) -> None:
    """Before `echo` decodes them: the tokenizer overflows on an id past 2**32."""
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400, f"prompt: token id {bad} is outside the vocabulary [0, {vocab})", param="prompt"
        )


async def create_completion(state: ServerState, request: Request) -> Response:
    req = CompletionRequest.model_validate_json(await request.body())
    headers = fields.check(request, req, strict=state.config.strict_fields)
    state.check_model(req.model)
    req.check()
    jobs, prompt_texts = _jobs(state, req)
    rid = f"cmpl-{uuid.uuid4().hex}"
    gen = await Generation.start(
        state, request, jobs, request_id=rid, priority=req.priority, user=req.user
    )
    render = CompletionRender(state, rid, req, prompt_texts)
    if req.stream:
        return sse_response(state, gen, render, rid, headers)
    outs = await collect(request, gen)
    state.metrics.count(200)
    return JSONResponse(render.whole(outs).model_dump(), headers={"x-request-id": rid, **headers})


class CompletionRender:
    """Choices for the whole response or for stream chunks, with echo and logprobs."""

    def __init__(
        self, state: ServerState, rid: str, req: CompletionRequest, prompt_texts: list[str]
    ) -> None:
        self.texts = state.texts
        self.req = req
        self.prompt_texts = prompt_texts
        self.deltas = Deltas(req.n)
        self.offsets: dict[int, int] = {}  # choice → text offset of its next token
        self.base = {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.model_name,
        }
        if req.include_usage:
            self.base["usage"] = None

    def _choice(
        self,
        out: RequestOutput,
        index: int,
        text: str,
        logprobs: list | None,
        finish_reason: str | None,
        first: bool,
    ) -> CompletionChoice:
        echo = self.prompt_texts[index // self.req.n] if self.req.echo and first else ""
        lp = None
        if self.req.logprobs is not None:
            offset = self.offsets.get(index, 0)
            prompt = None
            if self.req.echo and first:
                assert out.prompt_logprobs is not None  # all in before the first token
                prompt = (out.prompt_token_ids, out.prompt_logprobs)
            lp, self.offsets[index] = completion_logprobs(
                logprobs or [], self.texts, offset, prompt
            )
        return CompletionChoice(
            index=index, text=echo + text, logprobs=lp, finish_reason=finish_reason
        )

    def whole(self, outs: list[RequestOutput]) -> Completion:
        choices = [
            self._choice(
                out, i * self.req.n + o.index, o.text, o.logprobs, o.finish_reason, first=True
            )
            for i, out in enumerate(outs)
            for o in out.outputs
        ]
        return Completion(
            id=self.base["id"], model=self.base["model"], choices=choices, usage=usage_of(outs)
        )

    def head(self) -> str:
        return ""

    def update(self, prompt_index: int, out: RequestOutput) -> str:
        return "".join(
            event(
                {
                    **self.base,
                    "choices": [
                        self._choice(
                            out, d.index, d.text, d.logprobs, d.finish_reason, d.first
                        ).model_dump()
                    ],
                }
            )
            for d in self.deltas(prompt_index, out)
        )

    def tail(self, usage: Usage) -> str:
        if not self.req.include_usage:
            return ""
        return event({**self.base, "choices": [], "usage": usage.model_dump()})
