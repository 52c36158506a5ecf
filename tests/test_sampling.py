"""sampling.py: the one sampler (temperature, top-k, top-p, min-p, a request's own generator), the
per-row penalties and logit_bias, log-probabilities, and the stop rule."""
import pytest
import torch

import sampling
from helpers import chi_square


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 50)
    token, _ = sampling.sample(logits, temperature=0.0, top_k=3, top_p=0.5)
    assert token.view(-1).tolist() == logits.argmax(-1).tolist()


def test_top_k_keeps_the_k_most_likely_tokens_renormalized():
    logits = torch.tensor([[1.0, 3.0, 0.5, 2.0, -1.0, 2.5]])
    probs = sampling.logits_to_probs(logits, temperature=0.5, top_k=3)
    expected = torch.zeros_like(probs)
    expected[0, [1, 3, 5]] = torch.softmax(logits[0, [1, 3, 5]] / 0.5, -1)
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("top_p, kept",
                         [(0.3, [0]), (0.75, [0, 1]), (0.85, [0, 1, 2]), (1.0, [0, 1, 2, 3])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = sampling.logits_to_probs(p.log(), temperature=1.0, top_p=top_p)
    expected = torch.zeros_like(p)
    expected[0, kept] = p[0, kept] / p[0, kept].sum()
    torch.testing.assert_close(probs, expected)


def test_top_p_keeps_the_most_likely_token_even_when_it_alone_exceeds_p():
    probs = sampling.logits_to_probs(torch.tensor([[5.0, 0.0, 0.0]]), temperature=1.0, top_p=0.01)
    assert probs.tolist() == [[1.0, 0.0, 0.0]]


def test_samples_follow_the_truncated_distribution():
    # 8 tokens; top-k 5 drops three, then top-p 0.9 drops the least likely survivor: 4 remain, 3
    # degrees of freedom
    logits = torch.tensor([2.0, 1.5, -3.0, 1.0, 0.2, -2.0, 0.5, -4.0])
    kw = dict(temperature=0.8, top_k=5, top_p=0.9)
    probs = sampling.logits_to_probs(logits[None], **kw)[0]
    assert (probs > 0).sum() == 4
    torch.manual_seed(0)
    n = 40_000
    tokens, _ = sampling.sample(logits.expand(n, -1), **kw)
    # P(chi2 with 3 dof > 25) ~ 1.6e-5: fails if sampling ignores temperature, top-k or top-p
    assert chi_square(tokens.view(-1).long(), probs) < 25


def test_sampling_compiles_fullgraph_and_matches_eager():
    logits = torch.tensor([[2.0, 1.5, -3.0, 1.0, 0.2, -2.0, 0.5, -4.0]]).expand(1000, -1)
    kw = dict(temperature=0.8, top_k=5, top_p=0.9)
    compiled = torch.compile(sampling.sample, fullgraph=True)
    tokens, probs = compiled(logits, **kw)
    torch.testing.assert_close(probs, sampling.logits_to_probs(logits, **kw))
    assert chi_square(tokens.view(-1).long(), probs[0]) < 25


@pytest.mark.parametrize("kw", [dict(temperature=0.7, min_p=0.1),
                                dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.1)])
def test_the_distribution_is_transformers_warpers_in_their_order(kw):
    """temperature, top-k, top-p, min-p as transformers' generate() chains its warpers."""
    from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
    logits = torch.randn(3, 200, generator=torch.Generator().manual_seed(0))
    warpers = [TemperatureLogitsWarper(kw["temperature"])]
    warpers += [TopKLogitsWarper(kw["top_k"])] if "top_k" in kw else []
    warpers += [TopPLogitsWarper(kw["top_p"])] if "top_p" in kw else []
    warpers += [MinPLogitsWarper(kw["min_p"])]
    want = logits.clone()
    for w in warpers:
        want = w(None, want)
    probs = sampling.logits_to_probs(logits, **kw)
    torch.testing.assert_close(probs, want.softmax(-1))
    assert 0 < int((probs[0] > 0).sum()) < 200  # min-p dropped some tokens, kept some


def test_a_generator_alone_decides_a_requests_draws():
    logits = torch.randn(1, 100)
    kw = dict(temperature=1.0)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [int(sampling.sample(logits, generator=g, **kw)[0]) for _ in range(20)]
    torch.manual_seed(0)
    a = draws(7)
    torch.manual_seed(1)  # the global generator does not matter
    assert draws(7) == a and draws(8) != a
    state = torch.get_rng_state()
    draws(9)
    assert torch.equal(torch.get_rng_state(), state)  # nor is it advanced


def test_penalties_and_logit_bias_follow_openais_formula():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    tokens = [1, 3, 3, 3]
    out = sampling.Penalties(presence=0.5, frequency=0.25,
                             bias={0: 10.0, 4: -100.0})(tokens, logits)
    #    logit - frequency * count - presence * (count > 0) + bias
    want = [1 + 10, 2 - 0.25 - 0.5, 3, 4 - 0.75 - 0.5, 5 - 100]
    torch.testing.assert_close(out, torch.tensor(want))
    assert torch.equal(sampling.Penalties()(tokens, logits), logits)


def test_logprobs_are_the_log_softmax_and_its_most_likely_tokens():
    logits = torch.tensor([0.0, 3.0, -float("inf"), 1.0])
    lp, top = sampling.logprobs(logits, 3, 3)
    want = logits.log_softmax(-1)
    assert lp == pytest.approx(float(want[3]))
    assert [t for t, _ in top] == [1, 3, 0] and top[0][1] == pytest.approx(float(want[1]))
    assert sampling.logprobs(logits, 2, 0) == (sampling.LOGPROB_FLOOR, [])  # no -inf: JSON has none


def test_the_stop_rule():
    eos, stop_at_7 = {2}, lambda t: t == 7
    assert sampling.stop_reason(2, 1, 10, eos, stop_at_7) == "stop"  # eos, kept as the last token
    assert sampling.stop_reason(7, 1, 10, eos, stop_at_7) == "stop"  # a stop string completed
    assert sampling.stop_reason(5, 10, 10, eos, stop_at_7) == "length"
    assert sampling.stop_reason(5, 9, 10, eos, stop_at_7) is None
    seen = []
    sampling.stop_reason(2, 1, 10, eos, seen.append)
    assert seen == []  # eos ids are not passed on
