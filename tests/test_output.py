"""Output processing (llmos/engine/output.py): the text-filter seam, and several tokens per step."""

from __future__ import annotations

from llmos import LLM, SamplingParams
from llmos.engine.output import FilterVerdict
from llmos.engine.sequence import SequenceStatus

PROMPT = "The sea at night is"


class Recorder:
    """Holds back the last 3 characters; stops once `word` appears (if given)."""

    def __init__(self, word: str | None = None) -> None:
        self.seen = ""
        self.finals = 0
        self.word = word

    def feed(self, delta: str, final: bool) -> FilterVerdict:
        self.seen += delta
        self.finals += final
        if self.word is not None and self.word in self.seen:
            return FilterVerdict(hold=len(self.seen) - self.seen.index(self.word), stop=True)
        return FilterVerdict(hold=min(3, len(self.seen)))


def _run(llm: LLM, rid: str, params: SamplingParams, filt: Recorder) -> list[str]:
    engine = llm.engine
    engine.add_request(rid, PROMPT, params)
    (seq,) = engine.requests[rid]
    seq.output_filters.append(filt)
    shown: list[str] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            shown.append(out.outputs[0].text)
    return shown


def test_a_filter_sees_all_text_and_holds_back_its_tail(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=24, stop=["zzz"], ignore_eos=True)
    plain = llm.generate(PROMPT, params)[0].text
    filt = Recorder()
    shown = _run(llm, "filt-1", params, filt)
    assert filt.seen == plain and filt.finals == 1
    # while running, the visible text is what both the stop strings and the filter released
    for text in shown[:-1]:
        assert plain.startswith(text) and len(text) <= max(0, len(plain) - 3)
    assert shown[-1] == plain[: len(plain) - 3]  # what it still held at the end is dropped


def test_a_filter_stops_the_sequence_as_content_filter(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    plain = llm.generate(PROMPT, params)[0].text
    words = plain.split()
    assert len(words) > 3
    word = words[2]
    filt = Recorder(word)
    engine = llm.engine
    engine.add_request("filt-2", PROMPT, params)
    (seq,) = engine.requests["filt-2"]
    seq.output_filters.append(filt)
    last = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            last = out
            assert word not in out.outputs[0].text
    assert last is not None and last.finished
    assert last.outputs[0].finish_reason == "content_filter"
    assert seq.status is SequenceStatus.FINISHED_FILTERED
    assert plain.startswith(last.outputs[0].text) and len(last.outputs[0].token_ids) < 32
    assert engine.blocks.num_used == 0
