"""no-hit-lru-scorer: a cold request goes where cold requests went least recently (llm-d-router)."""

from epp.scheduling.framework import SchedulingResult
from epp.scheduling.plugins.approx_prefix_cache_producer import ApproxPrefixCacheProducer
from epp.scheduling.plugins.no_hit_lru_scorer import NoHitLRUScorer
from tests.helpers import cycle_state, endpoint, request


def setup():
    prefix = ApproxPrefixCacheProducer("p")
    scorer = NoHitLRUScorer(producer_name="p")
    scorer.bind({"p": prefix}.get)
    return prefix, scorer, [endpoint(1), endpoint(2), endpoint(3)]


def send(scorer, prefix, eps, prompt, to):
    st, req = cycle_state(), request(prompt)
    scores = scorer.score(st, req, eps)
    result = SchedulingResult([to], eps)
    scorer.pre_request(st, req, result)
    prefix.pre_request(st, req, result)
    return scores


def test_never_used_first_then_least_recently_used() -> None:
    prefix, scorer, eps = setup()
    assert send(scorer, prefix, eps, "cold one", eps[0]) == [1.0, 0.5, 0.0]  # nothing used yet: candidate order
    # eps[0] took a cold request: the two never used lead, eps[0] is last.
    assert send(scorer, prefix, eps, "cold two", eps[2]) == [0.0, 1.0, 0.5]
    # Now eps[1] alone is unused; eps[0] is older than eps[2].
    assert scorer.score(cycle_state(), request("cold three"), eps) == [0.5, 1.0, 0.0]


def test_a_warm_request_is_neutral_and_does_not_move_the_lru() -> None:
    prefix, scorer, eps = setup()
    send(scorer, prefix, eps, "shared prompt " * 20, eps[0])
    warm = send(scorer, prefix, eps, "shared prompt " * 20 + "more", eps[0])
    assert warm == [0.5, 0.5, 0.5]
    # Only the first (cold) request counted: eps[0] is the one most recently used.
    assert scorer.score(cycle_state(), request("new"), eps) == [0.0, 1.0, 0.5]


def test_one_candidate_scores_one() -> None:
    _, scorer, eps = setup()
    assert scorer.score(cycle_state(), request("x"), eps[:1]) == [1.0]


def test_the_lru_is_bounded() -> None:
    prefix, scorer, eps = setup()
    scorer.lru_size = 1
    send(scorer, prefix, eps, "a", eps[0])
    send(scorer, prefix, eps, "b", eps[1])
    assert list(scorer._lru) == [eps[1].hostport]
