"""The sampler's pure functions on synthetic logits: no model."""

from __future__ import annotations

import pytest
import torch

from llmos.engine.sampling import (
    SamplingBatch,
    SamplingParams,
    apply_penalties,
    apply_top_k_top_p_min_p,
    sample,
    uniform_draws,
)
from llmos.errors import RequestError


def batch(b: int, **kw: object) -> SamplingBatch:
    base = dict(
        temperature=torch.ones(b),
        greedy=torch.zeros(b, dtype=torch.bool),
        top_k=None,
        top_p=None,
        min_p=None,
        generators=[None] * b,
    )
    base.update(kw)
    return SamplingBatch(**base)  # type: ignore[arg-type]


def kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(row > float("-inf")).flatten().tolist() for row in logits]


def test_top_k_keeps_k_per_row() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [4.0, 3.0, 2.0, 1.0]])
    out = apply_top_k_top_p_min_p(logits, batch(2, top_k=torch.tensor([2, 4])))
    assert kept(out) == [[1, 2], [0, 1, 2, 3]]


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_k_top_p_min_p(probs.log(), batch(1, top_p=torch.tensor([0.8])))
    assert kept(out) == [[0, 1]]  # 0.5 + 0.3 reaches 0.8
    out = apply_top_k_top_p_min_p(probs.log(), batch(1, top_p=torch.tensor([0.81])))
    assert kept(out) == [[0, 1, 2]]
    tiny = apply_top_k_top_p_min_p(probs.log(), batch(1, top_p=torch.tensor([1e-6])))
    assert kept(tiny) == [[0]]  # the best token always survives


def test_min_p_scales_with_the_top_probability() -> None:
    probs = torch.tensor([[0.6, 0.3, 0.07, 0.03]])
    out = apply_top_k_top_p_min_p(probs.log(), batch(1, min_p=torch.tensor([0.1])))
    assert kept(out) == [[0, 1, 2]]  # threshold 0.06


def test_penalties() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    b = batch(
        1,
        repetition=torch.tensor([2.0]),
        presence=torch.tensor([0.5]),
        frequency=torch.tensor([0.25]),
        output_counts=torch.tensor([[0.0, 0.0, 2.0, 0.0]]),
        seen=torch.tensor([[True, True, True, False]]),
    )
    out = apply_penalties(logits, b)
    # rep: 2→1, -2→-4, 1→0.5 ; then token 2 (count 2): -0.25*2 - 0.5
    assert torch.allclose(out, torch.tensor([[1.0, -4.0, 0.5 - 0.5 - 0.5, 0.5]]))


def test_greedy_rows_take_argmax_whatever_the_noise() -> None:
    logits = torch.randn(4, 50)
    b = batch(4, greedy=torch.tensor([True, False, True, False]))
    for _ in range(5):
        out = sample(logits, b)
        assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_seeded_row_ignores_other_rows() -> None:
    def gen(seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    alone = uniform_draws(1, [gen(7)], torch.device("cpu"))
    mixed = uniform_draws(3, [None, gen(7), None], torch.device("cpu"))
    assert torch.equal(alone[0], mixed[1])


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().repeat(4000, 1)
    torch.manual_seed(0)
    draws = sample(logits, batch(4000))
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("min_p", 2.0),
        ("n", 0),
        ("max_tokens", 0),
        ("presence_penalty", 3.0),
        ("frequency_penalty", -2.5),
        ("repetition_penalty", 0.0),
        ("logprobs", 21),
    ],
)
def test_bad_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(RequestError, match=field) as info:
        SamplingParams(**{field: value})
    assert info.value.param == field
