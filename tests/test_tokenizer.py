"""The tokenizer against HF's, which reads the same GGUF: ids, decoding, the chat template, and
incremental detokenization that never emits half a character."""

from __future__ import annotations

import unicodedata
from typing import Any

import pytest
from hf_oracle import hf_tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import pre_tokenizers

from llmos import LLM
from llmos.models.tokenizer import IncrementalDetokenizer, Tokenizer

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CORPUS = [
    "",
    " ",
    "a",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX? don't, we'll, they're",
    # code in several languages
    'def f(x: int) -> int:\n    """Double."""\n    return x * 2  # comment\n',
    '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
    'fn main() { let v: Vec<u8> = vec![1, 2, 3]; println!("{:?}", v); }',
    "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    '<div class="x">&amp; &lt;tag&gt;</div>',
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
    # Unicode: CJK, Arabic, Devanagari, Cyrillic, Greek, Hebrew, Thai, combining marks
    "日本語のテキストと中文文本，还有한국어도 있습니다。",
    "مرحبا بالعالم، كيف حالك؟",
    "नमस्ते दुनिया, आप कैसे हैं?",
    "Привет, мир! Ελληνικά κείμενα. שלום עולם. สวัสดีชาวโลก",
    "e\u0301 n\u0303 a\u030a\u0323 Z\u0351\u0358\u0300\u0301a\u0310l\u0352go",
    "Ａｂｃ ｆｕｌｌｗｉｄｔｈ ｛｝ and ligature ﬁ ﬂ, ß, İstanbul",
    # emoji: plain, skin tones, ZWJ sequences, flags, keycaps
    "🤗🚀✨🔥 👍🏽👋🏿 👨‍👩‍👧‍👦 🏳️‍🌈 🧑🏻‍💻 🇫🇷🇯🇵🇺🇸 1️⃣ #️⃣",
    # whitespace runs
    "a  b   c    d\t\te\t \tf\n\ng\n\n\nh\r\nend   ",
    "\n\n\n\n",
    "\t\t\t",
    "          leading and trailing          ",
    "\u00a0non-breaking\u2003em-space\u200bzero-width\u3000ideographic",
    # numbers and dates
    "3.14159 1,000,000 -42 +7 1e-9 0x1F 2024-01-15T12:34:56Z 12/31/1999 $19.99 50%",
    "1234567890123456789012345678901234567890",
    # special tokens inside text
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
    "before<|endoftext|>after",
    "<|im_end|><|im_end|><|im_start|>",
    "not special: <|im_start |> <im_end> <|endoftext",
    "<repo_name>llmos<file_sep>main.py",
    # very long words
    "a" * 3000,
    "Pneumonoultramicroscopicsilicovolcanoconiosis" * 40,
    "x" + "🙂" * 300,
    "\ufffd replacement char and \x00 NUL \x1b[31m ANSI",
]
CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in 日本語 🎨?"},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "List\n\ttwo  primes."},
        {"role": "assistant", "content": '{"primes": [2, 3]}'},
        {"role": "user", "content": ""},
    ],
]


@pytest.fixture(scope="module")
def hf() -> Any:
    return hf_tokenizer()


@pytest.fixture(scope="module")
def hf_smollm(hf: Any) -> HFTokenizer:
    """HF's tokenizer with SmolLM2's own pre-tokenizer. The GGUF says `tokenizer.ggml.pre =
    "smollm"`: llama.cpp splits digits apart first (`\\p{N}`), then applies GPT-2's regex, as
    SmolLM2's tokenizer.json does (Digits, then ByteLevel). transformers' GGUF converter has no
    "smollm" entry and falls back to GPT-2's regex alone, which splits whitespace before a digit
    differently: "\\r\\n0" is "\\r", "\\n", "0" there but "\\r\\n", "0" in llama.cpp."""
    fixed = HFTokenizer.from_str(hf.backend_tokenizer.to_str())
    fixed.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return fixed


def space_before_number(text: str) -> bool:
    """Where HF's GGUF pre-tokenizer and SmolLM2's differ (see `hf_smollm`)."""
    return any(
        a.isspace() and unicodedata.category(b)[0] == "N"
        for a, b in zip(text, text[1:], strict=False)
    )


@pytest.fixture(scope="module")
def tok(llm: LLM) -> Tokenizer:
    return llm.tokenizer


# -- ids ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_ids_match_hf(tok: Tokenizer, hf: Any, text: str) -> None:
    assert tok.encode(text) == hf.encode(text)
    assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", CORPUS, ids=range(len(CORPUS)))
def test_decode_matches_hf_and_round_trips(tok: Tokenizer, hf: Any, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


SPACE_THEN_DIGITS = [
    "\r\n0",
    "Steps:\n\n1. mix\n2. bake",
    "x =\t\t42",
    "a  1   22    333",
    "\n\n\n٣ and \u3000½",
]


@pytest.mark.parametrize("text", SPACE_THEN_DIGITS, ids=range(len(SPACE_THEN_DIGITS)))
def test_whitespace_before_digits_splits_as_smollm2_does(
    tok: Tokenizer, hf_smollm: HFTokenizer, text: str
) -> None:
    assert space_before_number(text)
    assert tok.encode(text) == hf_smollm.encode(text).ids
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids(tok: Tokenizer, hf: Any) -> None:
    for s in SPECIAL:
        (token_id,) = tok.encode(s)
        assert token_id == hf.convert_tokens_to_ids(s)
        assert tok.decode([token_id]) == ""  # skipped by default
    assert tok.eos_token_id == hf.eos_token_id
    assert tok.bos_token_id == hf.convert_tokens_to_ids(hf.bos_token)


def test_corpus_is_varied(tok: Tokenizer) -> None:
    """The corpus reaches byte fallback (multi-token characters) and special tokens."""
    assert all(representable(tok, text) for text in CORPUS)
    assert not representable(tok, "\U00040000") and not representable(tok, "\x04")
    ids = [i for text in CORPUS for i in tok.encode(text)]
    specials = {tok.encode(s)[0] for s in SPECIAL}
    assert specials <= set(ids)
    assert any(len(tok.encode(ch)) > 1 for ch in "👨‍👩‍👧‍👦日नم")
    assert len(tok.encode("a" * 3000)) > 1


# -- chat template ------------------------------------------------------------------------
@pytest.mark.parametrize("messages", CONVERSATIONS, ids=range(len(CONVERSATIONS)))
def test_chat_template_matches_hf(tok: Tokenizer, hf: Any, messages: list[dict[str, str]]) -> None:
    for gen in (True, False):
        text = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    assert tok.encode_chat(messages) == list(ids)


def test_chat_template_renders_the_model_default_system_prompt(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(CONVERSATIONS[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "You are terse." in tok.apply_chat_template(CONVERSATIONS[1])


# -- incremental detokenization -----------------------------------------------------------
def stream(
    tok: Tokenizer,
    ids: list[int],
    prompt: list[int] | None = None,
    skip_special_tokens: bool = True,
) -> list[str]:
    """Feed ids one at a time, then flush; return every non-empty delta."""
    detok = IncrementalDetokenizer(tok, prompt or [], skip_special_tokens)
    deltas = [detok.add([i]) for i in ids]
    deltas.append(detok.add([], final=True))
    return [d for d in deltas if d]


MULTIBYTE = [
    "👨‍👩‍👧‍👦 family, 🇯🇵 flag, 👍🏽 thumbs",
    "日本語のテキストと中文文本",
    "नमस्ते दुनिया",
    "🙂" * 20 + "🤗",
    "mixed ascii 😀 then 中文 then e\u0301",
]


@pytest.mark.parametrize("text", MULTIBYTE, ids=range(len(MULTIBYTE)))
def test_detokenizer_never_emits_half_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    # the point of the test: single tokens here are partial UTF-8 sequences
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas = stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas), deltas
    assert "".join(deltas) == tok.decode(ids) == text


def test_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("User said: 日本 and 🤗")
    out = tok.encode(" 語のテキスト 👨‍👩‍👧 done")
    deltas = stream(tok, out, prompt)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(out)


def test_detokenizer_skips_special_tokens_like_decode(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\n日本 🤗<|im_end|>\n<|endoftext|>")
    for skip in (True, False):
        assert "".join(stream(tok, ids, skip_special_tokens=skip)) == tok.decode(
            ids, skip_special_tokens=skip
        )


def test_detokenizer_final_flushes_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("ok 🤗")
    cut = ids[:-1]  # the emoji's last byte is missing
    assert tok.decode(cut).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    held = "".join(detok.add([i]) for i in cut)
    assert held.startswith("ok") and "\ufffd" not in held  # the half emoji is held back ...
    flushed = detok.add([], final=True)  # ... until the stream ends
    assert flushed.endswith("\ufffd") and held + flushed == tok.decode(cut)
    assert detok.add([], final=True) == ""


def test_detokenizer_emits_multiple_tokens_at_once(tok: Tokenizer) -> None:
    ids = tok.encode("abc 日本語 🤗 xyz")
    detok = IncrementalDetokenizer(tok, [])
    parts = [detok.add(ids[i : i + 3]) for i in range(0, len(ids), 3)]
    parts.append(detok.add([], final=True))
    assert all("\ufffd" not in p for p in parts)
    assert "".join(parts) == tok.decode(ids)


# -- properties ---------------------------------------------------------------------------
INTERESTING = [
    *SPECIAL,
    "👨‍👩‍👧",
    "🇫🇷",
    "👍🏽",
    "日",
    "本",
    "ن",
    "न",
    "\u0301",
    "\u200d",
    " ",
    "  ",
    "\t",
    "\n",
    "\r\n",
    "0",
    "42",
    "a",
    "Z",
    "'s",
    "<",
    "|",
    ">",
    "é",
]


_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def representable(tok: Tokenizer, text: str) -> bool:
    """Whether the vocabulary has every byte of `text`. SmolLM2's lacks 21 of the 256 (0xF1
    and 0xF2, which lead planes 4-11, and a few control bytes), so BPE drops those, and HF's
    tokenizer does the same: such text cannot round-trip."""
    return all(
        tok.hf.token_to_id(ch) is not None
        for piece, _ in _BYTES.pre_tokenize_str(text)
        for ch in piece
    )


def test_property_ids_match_hf_and_stream_decodes(
    tok: Tokenizer, hf: Any, hf_smollm: HFTokenizer
) -> None:
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    texts = st.text(max_size=80) | st.lists(
        st.sampled_from(INTERESTING) | st.text(max_size=3), max_size=25
    ).map("".join)

    @hypothesis.settings(max_examples=400, deadline=None, derandomize=True)
    @hypothesis.given(texts)
    def check(text: str) -> None:
        ids = tok.encode(text)
        assert ids == hf_smollm.encode(text).ids
        if not space_before_number(text):
            assert ids == hf.encode(text)
        valid = representable(tok, text) and "\ufffd" not in text
        if valid:
            assert tok.decode(ids, skip_special_tokens=False) == text
        for skip in (True, False):
            deltas = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)
            if valid:
                assert all("\ufffd" not in d for d in deltas)

    check()
