"""lm-evaluation-harness against `llmos serve`: its real `local-completions` model, with its
`remote` tokenizer (our /tokenize and /detokenize), scores a multiple-choice task through
`/v1/completions` with `echo` and `logprobs` (the call that got a 400 before prompt logprobs).
The answers it picks must be the ones the engine's own prompt logprobs pick."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tenacity  # noqa: E402,F401 - lm-eval's API models need lm-eval[api]: fail loudly without it
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llmos import LLM, SamplingParams  # noqa: E402
from llmos.engine.async_engine import AsyncEngine  # noqa: E402
from llmos.server.app import create_app  # noqa: E402
from llmos.server.launch import RunningServer, serve_in_thread  # noqa: E402

QUESTIONS = [
    ("The capital of France is", [" Paris", " London", " Berlin", " a banana"]),
    ("Two plus two equals", [" four", " seven", " purple"]),
    ("The opposite of hot is", [" cold", " loud", " Tuesday"]),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " Fahrenheit of the sun"]),
    ("def add(a, b):\n    return", [" a + b", " a * b", " None  # TODO"]),
]


def own_logprob(llm: LLM, context: str, continuation: str) -> float:
    """The continuation's log-likelihood from the engine's own prompt logprobs, tokenized as
    lm-eval tokenizes (context and continuation apart, no special tokens)."""
    ctx = llm.tokenizer.encode(context, add_special_tokens=False)
    cont = llm.tokenizer.encode(continuation, add_special_tokens=False)
    out = llm.generate(ctx + cont, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))
    lps = out[0].prompt_logprobs
    return sum(lps[len(ctx) + i][t] for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def reference(llm: LLM) -> list[list[float]]:
    return [[own_logprob(llm, q, c) for c in choices] for q, choices in QUESTIONS]


@pytest.fixture(scope="module")
def server(llm: LLM, reference: list[list[float]]) -> Iterator[RunningServer]:
    with serve_in_thread(create_app(AsyncEngine(llm.engine))) as running:
        yield running


def lm(server: RunningServer, batch_size: int = 1) -> Any:
    return get_model("local-completions")(
        base_url=f"{server.url}/v1/completions",
        model="smollm2-135m",
        tokenizer_backend="remote",
        max_retries=1,
        batch_size=batch_size,  # > 1: one request carries a batch of token-id prompts
    )


def test_loglikelihood_picks_the_engines_answers(
    server: RunningServer, reference: list[list[float]]
) -> None:
    model = lm(server, batch_size=4)
    requests = [
        Instance("loglikelihood", doc={}, arguments=(q, c), idx=j)
        for q, choices in QUESTIONS
        for j, c in enumerate(choices)
    ]
    results = model.loglikelihood(requests)
    i = 0
    for (_, choices), ref in zip(QUESTIONS, reference, strict=True):
        got = [ll for ll, _greedy in results[i : i + len(choices)]]
        i += len(choices)
        assert got == pytest.approx(ref, abs=1e-3)
        assert max(range(len(got)), key=got.__getitem__) == max(
            range(len(ref)), key=ref.__getitem__
        )
    assert results[0][0] == max(r[0] for r in results[:4])  # " Paris" wins
    assert results[0][1] is True  # and is the greedy continuation


def test_simple_evaluate_on_a_local_task(
    server: RunningServer, reference: list[list[float]], tmp_path: Path
) -> None:
    """A multiple-choice task from a local JSONL file, run end to end by `simple_evaluate`."""
    gold = [max(range(len(r)), key=r.__getitem__) for r in reference]
    gold[-1] = (gold[-1] + 1) % len(QUESTIONS[-1][1])  # one the model gets wrong: acc < 1
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": q, "choices": [c.strip() for c in cs], "answer": g}) + "\n"
            for (q, cs), g in zip(QUESTIONS, gold, strict=True)
        )
    )
    (tmp_path / "llmos_qa.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: llmos_qa
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: answer
            target_delimiter: " "
            metric_list:
              - metric: acc
            """
        )
    )
    results = simple_evaluate(
        model=lm(server),
        tasks=["llmos_qa"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )
    acc = results["results"]["llmos_qa"]["acc,none"]
    assert acc == pytest.approx((len(QUESTIONS) - 1) / len(QUESTIONS))
    for sample, ref in zip(
        sorted(results["samples"]["llmos_qa"], key=lambda s: s["doc_id"]), reference, strict=True
    ):
        lls = [r[0] for r in sample["filtered_resps"]]
        assert lls == pytest.approx(ref, abs=1e-3)


def test_echo_logprobs_shape_through_the_openai_client(llm: LLM, server: RunningServer) -> None:
    """OpenAI's legacy shape: every prompt token then the generated ones; the first is null."""
    from openai import OpenAI

    prompt = QUESTIONS[0][0]
    ids = llm.tokenizer.encode(prompt)
    with OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as client:
        kw = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": 3, "temperature": 0}
        whole = client.completions.create(echo=True, logprobs=2, **kw).choices[0]
        chunks = list(client.completions.create(echo=True, logprobs=2, stream=True, **kw))
        plain = client.completions.create(logprobs=2, **kw).choices[0]
    lp = whole.logprobs
    assert whole.text == prompt + plain.text
    assert len(lp.tokens) == len(ids) + 3 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == whole.text and lp.text_offset[len(ids)] == len(prompt)
    for pos in range(1, len(ids)):
        top = lp.top_logprobs[pos]
        assert lp.tokens[pos] in top and top[lp.tokens[pos]] == lp.token_logprobs[pos]
        assert len(top) in (2, 3)  # the top 2, plus the prompt token where it is not in them
    assert lp.token_logprobs[len(ids) :] == plain.logprobs.token_logprobs
    streamed = [t for c in chunks for t in c.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert "".join(c.choices[0].text for c in chunks) == whole.text
