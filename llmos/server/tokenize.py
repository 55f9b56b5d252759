"""`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`: the model's tokenizer over
HTTP, in vLLM's shapes, so a client that counts tokens (lm-eval's `remote` tokenizer, a context
budget) needs no local copy of it.

`/tokenize` takes a `prompt` (special tokens added, as for `/v1/completions`) or `messages`
(rendered by the chat template with tools, exactly as `/v1/chat/completions` renders them).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from llmos.server import fields
from llmos.server.chat import prompt_ids
from llmos.server.errors import APIError
from llmos.server.protocol import ChatCompletionRequest, ChatMessage, _Request
from llmos.server.state import ServerState


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


async def tokenize(state: ServerState, request: Request) -> JSONResponse:
    req = TokenizeRequest.model_validate_json(await request.body())
    headers = fields.check(request, req, strict=state.config.strict_fields)
    state.check_model(req.model)
    tokenizer = state.engine.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt or messages", param="prompt")
    if req.prompt is not None:
        if req.tools is not None:
            raise APIError(400, "tools go with messages, not with a prompt", param="tools")
        state.check_text_fits(len(req.prompt), "prompt")
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tokenizer.encode(req.prompt, add_special_tokens=add)
    else:
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        chat = ChatCompletionRequest(
            messages=req.messages,
            tools=req.tools,
            add_generation_prompt=req.add_generation_prompt,
        )
        ids, _ = prompt_ids(state, chat)
        if req.add_special_tokens and tokenizer.add_bos and tokenizer.bos_token_id is not None:
            if not ids or ids[0] != tokenizer.bos_token_id:
                ids = [tokenizer.bos_token_id, *ids]
    body = TokenizeResponse(
        count=len(ids),
        max_model_len=state.max_model_len,
        tokens=ids,
        token_strs=[tokenizer.id_to_token(t) or "" for t in ids] if req.return_token_strs else None,
    )
    return JSONResponse(body.model_dump(), headers=headers)


async def detokenize(state: ServerState, request: Request) -> JSONResponse:
    req = DetokenizeRequest.model_validate_json(await request.body())
    headers = fields.check(request, req, strict=state.config.strict_fields)
    state.check_model(req.model)
    vocab = state.engine.engine.model_config.vocab_size
    bad = next(((i, t) for i, t in enumerate(req.tokens) if not 0 <= t < vocab), None)
    if bad is not None:
        raise APIError(
            400,
            f"tokens[{bad[0]}]: token id {bad[1]} is outside the vocabulary [0, {vocab})",
            param=f"tokens[{bad[0]}]",
        )
    text = state.engine.tokenizer.decode(req.tokens, skip_special_tokens=False)
    return JSONResponse(DetokenizeResponse(prompt=text).model_dump(), headers=headers)


def tokenizer_info(state: ServerState) -> dict[str, Any]:
    """What a remote-tokenizer client reads: the special tokens and the chat template."""
    tok = state.engine.tokenizer

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.id_to_token(token_id)

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": text(tok.eos_token_id),
        "bos_token": text(tok.bos_token_id),
        "pad_token": text(tok.eos_token_id),
        "add_bos_token": tok.add_bos,
        "chat_template": tok.chat_template,
        "model_max_length": state.max_model_len,
        "vocab_size": state.engine.engine.model_config.vocab_size,
    }
