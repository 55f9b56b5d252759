"""Log-probabilities in OpenAI's two shapes: chat's list of tokens, completions' parallel lists.

A token's `bytes` are its raw bytes, which for byte-level BPE may be part of one character;
its `token` text is what decoding it alone gives.
"""

from __future__ import annotations

from tokenizers import decoders

from llmos.engine.sequence import TokenLogprob
from llmos.models.tokenizer import Tokenizer
from llmos.server.protocol import ChatLogprobs, ChatLogprobToken, ChatLogprobTop, CompletionLogprobs


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte ↔ printable character map, reversed: vocabulary character → byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF = _byte_level_alphabet()


class TokenTexts:
    """Token id → (text, raw bytes), cached: a vocabulary is small and logprobs repeat tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._special = set(tokenizer.hf.get_added_tokens_decoder())
        self._byte_level = isinstance(tokenizer.hf.decoder, decoders.ByteLevel)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            hit = self._cache[token_id] = self._lookup(token_id)
        return hit

    def _lookup(self, token_id: int) -> tuple[str, list[int]]:
        text = self._tokenizer.decode([token_id], skip_special_tokens=False)
        piece = self._tokenizer.id_to_token(token_id)
        if (
            self._byte_level
            and token_id not in self._special
            and piece is not None
            and all(c in _BYTE_OF for c in piece)
        ):
            return text, [_BYTE_OF[c] for c in piece]
        return text, list(text.encode())


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> ChatLogprobs:
    content = []
    for e in entries:
        token, raw = texts(e.token_id)
        top = [
            ChatLogprobTop(token=t, logprob=lp, bytes=b)
            for t, b, lp in ((*texts(tid), lp) for tid, lp in e.top)
        ]
        content.append(
            ChatLogprobToken(token=token, logprob=e.logprob, bytes=raw, top_logprobs=top)
        )
    return ChatLogprobs(content=content)


def completion_logprobs(
    entries: list[TokenLogprob],
    texts: TokenTexts,
    offset: int,
    prompt: tuple[list[int], list[dict[int, float] | None]] | None = None,
) -> tuple[CompletionLogprobs, int]:
    """The logprobs, with `text_offset` counted from `offset`; also the offset after them.

    With `prompt` (its token ids and their logprobs in vLLM's shape), an echoed prompt's
    tokens come first, as OpenAI's legacy API gave them: the first with a null logprob and
    null top, each other one with its top entries, the prompt token among them."""
    tokens: list[str] = []
    offsets: list[int] = []
    logprobs: list[float | None] = []
    top: list[dict[str, float] | None] = []
    for tid, entry in zip(*(prompt or ((), ())), strict=True):
        tokens.append(texts(tid)[0])
        logprobs.append(None if entry is None else entry[tid])
        top.append(None if entry is None else {texts(t)[0]: lp for t, lp in entry.items()})
    for e in entries:
        tokens.append(texts(e.token_id)[0])
        logprobs.append(e.logprob)
        top.append({texts(tid)[0]: lp for tid, lp in e.top})
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    return CompletionLogprobs(
        tokens=tokens, token_logprobs=logprobs, top_logprobs=top, text_offset=offsets
    ), offset
