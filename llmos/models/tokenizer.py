"""Tokenizer from the model file (HF `tokenizers`), the chat template (Jinja, as HF renders it)
and incremental UTF-8-safe detokenization."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

# llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`) → HF pre-tokenizers that split alike.
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3", "dbrx", "smaug-bpe"):
        return _split(_LLAMA3_RE)
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split(_QWEN2_RE)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _tojson(
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile as HF's `apply_chat_template` does: sandboxed, trim/lstrip blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """Text ↔ token ids, with the model's special tokens, BOS rule and chat template."""

    def __init__(
        self,
        hf: HFTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: str | None,
    ) -> None:
        self.hf = hf
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.eos_token_id = self.eos_token_ids[0] if self.eos_token_ids else None
        self.add_bos = add_bos
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(
                f"tokenizer.ggml.model: {kind!r} is not supported from GGUF yet "
                "(only byte-level BPE, 'gpt2'); load the model's HF folder instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        hf.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
        hf.decoder = decoders.ByteLevel()
        # CONTROL (3) tokens are special; USER_DEFINED (4) are matched whole but not special.
        added = [
            AddedToken(tokens[i], special=(t == 3), normalized=False)
            for i, t in enumerate(types)
            if t in (3, 4)
        ]
        hf.add_tokens(added)
        bos = meta.get("tokenizer.ggml.bos_token_id")
        eos = [
            meta[k]
            for k in (
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id",
            )
            if meta.get(k) is not None
        ]
        return cls(
            hf,
            bos_token_id=bos,
            eos_token_ids=list(dict.fromkeys(eos)),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", bos is not None)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        folder = Path(folder)
        hf = HFTokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = _read_json(folder / "tokenizer_config.json")
        gen = _read_json(folder / "generation_config.json")

        def token_id(value: Any) -> int | None:
            if isinstance(value, dict):
                value = value.get("content")
            return hf.token_to_id(value) if isinstance(value, str) else None

        bos = token_id(cfg.get("bos_token"))
        eos_ids = gen.get("eos_token_id", token_id(cfg.get("eos_token")))
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids] if eos_ids is not None else []
        template = cfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if hf.post_processor is not None and cfg.get("add_bos_token") is None:
            add_bos = False  # the post-processor (e.g. Llama 3's TemplateProcessing) adds it
        else:
            add_bos = bool(cfg.get("add_bos_token", False)) and bos is not None
        return cls(
            hf, bos_token_id=bos, eos_token_ids=eos_ids, add_bos=add_bos, chat_template=template
        )

    # -- text ↔ ids -----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    # -- chat -----------------------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        if self._template is None:
            raise ValueError("messages: this model has no chat template; use generate() instead")
        bos = self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else ""
        eos = self.id_to_token(self.eos_token_id) if self.eos_token_id is not None else ""
        return self._template.render(
            messages=list(messages),
            tools=tools,
            bos_token=bos,
            eos_token=eos,
            add_generation_prompt=add_generation_prompt,
            **kwargs,
        )

    def encode_chat(self, messages: Sequence[dict[str, Any]], **kwargs: Any) -> list[int]:
        # The template writes the special tokens itself (as HF does, add_special_tokens=False).
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that never split a character.

    Decodes a small window (vLLM's prefix/read offsets) so each step costs O(window), and holds
    back a delta that ends in U+FFFD (an incomplete UTF-8 sequence) until the next token.
    """

    CONTEXT = 5  # prompt tokens decoded as left context, for tokenizers whose spacing depends on it

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-self.CONTEXT :])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int], final: bool = False) -> str:
        """Append tokens; return the text they complete (all pending text when `final`)."""
        self.ids.extend(token_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""
