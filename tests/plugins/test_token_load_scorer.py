"""token-load-scorer: 1 - (tokens in flight + this request's) / queueThresholdTokens (llm-d-router)."""

from epp.scheduling.framework import SchedulingResult
from epp.scheduling.params import Params
from epp.scheduling.plugins.inflight_load_producer import InFlightLoadProducer
from epp.scheduling.plugins.token_load_scorer import TokenLoadScorer
from tests.helpers import cycle_state, endpoint, request


def test_in_flight_tokens_and_this_requests_lower_the_score() -> None:
    load = InFlightLoadProducer("inflight-load-producer")
    scorer = TokenLoadScorer.from_parameters("t", Params("token-load-scorer", {"queueThresholdTokens": 1000}))
    scorer.bind({"inflight-load-producer": load}.get)
    eps = [endpoint(1), endpoint(2)]
    busy = request("y" * 2000)  # 500 tokens
    load.pre_request(cycle_state(), busy, SchedulingResult([eps[0]], eps))
    # This request: 100 tokens on either server.
    assert scorer.score(cycle_state(), request("x" * 400), eps) == [0.4, 0.9]  # type: ignore[attr-defined]


def test_an_empty_prompt_on_an_idle_server_scores_one_and_past_the_threshold_zero() -> None:
    load = InFlightLoadProducer("inflight-load-producer")
    scorer = TokenLoadScorer("t", threshold_tokens=100)
    scorer.bind({"inflight-load-producer": load}.get)
    assert scorer.score(cycle_state(), request(""), [endpoint(1)]) == [1.0]
    assert scorer.score(cycle_state(), request("x" * 4000), [endpoint(1)]) == [0.0]
