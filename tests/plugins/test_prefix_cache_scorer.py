"""prefix-cache-scorer: the share of a prompt's leading blocks epp sent to each endpoint before."""

from epp.scheduling.framework import SchedulingResult
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from tests.helpers import cycle_state, endpoint, request


def test_prefix_scorer_follows_what_was_sent() -> None:
    scorer = PrefixCacheScorer()
    eps = [endpoint(1), endpoint(2)]
    prompt = "shared system prompt. " * 20
    st = cycle_state()
    assert scorer.score(st, request(prompt), eps) == [0.0, 0.0]
    scorer.pre_request(st, request(prompt), SchedulingResult([eps[1]]))
    # Same prefix, different ending: endpoint 2 holds most of the blocks.
    scores = scorer.score(cycle_state(), request(prompt + "question one?"), eps)
    assert scores[0] == 0.0
    assert scores[1] == 6 / 8
    assert scorer.score(cycle_state(), request(prompt), eps) == [0.0, 1.0]
