"""The default profile with the servers' own load (prefill-load-scorer's scrapedLoad): what a pool
with traffic epp does not route needs.

Every test goes through the real director and scheduler with the default config, scrapedLoad on
(a no-op once the default carries it); the endpoints' metrics are what a scrape would have stored.
"""

from __future__ import annotations

from collections import Counter

from epp.datastore import Endpoint, EndpointMetrics
from epp.director import Director
from epp.scheduling import picker_config
from epp.scheduling.plugins.prefill_load_scorer import PrefillLoadScorer
from tests.helpers import NOW, endpoint, request
from tests.helpers import director as _director

_PLUGIN = "- type: prefill-load-scorer\n"
PROFILE = picker_config.DEFAULT_CONFIG
if "scrapedLoad" not in PROFILE:
    PROFILE = PROFILE.replace(_PLUGIN, _PLUGIN + "  parameters:\n    scrapedLoad: true\n", 1)


def director(*eps: Endpoint) -> Director:
    return _director(*eps, config=picker_config.load_text(PROFILE, "<default config>", seed=1))

DOC = "a long shared system prompt. " * 120  # ~870 tokens at 4 characters a token


def picks(d: Director, prompts: list[str]) -> Counter[int]:
    """Route each prompt, one at a time, each finishing before the next (light load)."""
    got: Counter[int] = Counter()
    for p in prompts:
        req = request(p)
        decision = d.decide(req)
        d.started(req, decision)
        d.finish(req, decision)
        got[decision.endpoint.port] += 1
    return got


def distinct(n: int, words: int = 40) -> list[str]:
    return [f"question {i}: " + "word " * words for i in range(n)]


def test_a_loaded_pod_gets_no_picks_while_an_idle_pod_exists() -> None:
    loaded, idle = endpoint(1), endpoint(2)
    loaded.metrics = EndpointMetrics(waiting=10, running=8, kv_usage=0.5, scraped_at=NOW)
    got = picks(director(loaded, idle), distinct(30))
    assert got == {2: 30}


def test_pods_with_unknown_or_stale_metrics_get_no_picks_while_fresh_pods_exist() -> None:
    unknown, stale, fresh = endpoint(1, waiting=None), endpoint(2, age=30.0), endpoint(3, waiting=3)
    got = picks(director(unknown, stale, fresh), distinct(20))
    assert got == {3: 20}


def test_a_prefix_holder_with_a_small_real_backlog_keeps_winning() -> None:
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    d = director(*eps)
    first = picks(d, [DOC + "first question?"])
    holder = next(iter(first))
    by_port = {ep.port: ep for ep in eps}
    # The holder's scrape shows a little work: one waiting request and two running.
    by_port[holder].metrics = EndpointMetrics(waiting=1, running=2, kv_usage=0.3, scraped_at=NOW)
    got = picks(d, [DOC + f"follow-up {i}?" for i in range(20)])
    assert got == {holder: 20}


def test_kv_pressure_does_not_push_requests_off_their_prefix_holder() -> None:
    """Under high load every server's KV cache runs full; the holder of a request's prefix stores only
    the new tokens there, where another server would store (and evict for) the whole prompt."""
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    d = director(*eps)
    holder = next(iter(picks(d, [DOC + "first question?"])))
    for ep in eps:
        ep.metrics = EndpointMetrics(kv_usage=0.98 if ep.port == holder else 0.5, scraped_at=NOW)
    got = picks(d, [DOC + f"follow-up {i}?" for i in range(20)])
    assert got == {holder: 20}
    # A prompt no server holds goes where the cache has room.
    fresh = picks(d, distinct(10))
    assert fresh[holder] == 0


def test_a_pod_busy_with_traffic_only_its_scrape_shows_loses_its_prefix_requests() -> None:
    eps = [endpoint(1), endpoint(2), endpoint(3), endpoint(4)]
    d = director(*eps)
    holder = next(iter(picks(d, [DOC + "first question?"])))
    by_port = {ep.port: ep for ep in eps}
    # Another client sends long prompts straight to the holder: epp sent none of them (its own
    # count there is 0), the scrape shows a queue, a full batch and a filling KV cache.
    by_port[holder].metrics = EndpointMetrics(waiting=6, running=8, kv_usage=0.9, scraped_at=NOW)
    got = picks(d, [DOC + f"follow-up {i}?" for i in range(20)])
    assert got[holder] == 0
    assert max(got.values()) == 20  # the follow-ups still share one other pod's cache


def test_epp_own_requests_the_scrape_also_shows_are_not_counted_twice() -> None:
    """A pod busy only with epp's own request costs about what epp sent, not that plus its scrape."""
    a, b = endpoint(1), endpoint(2)
    d = director(a, b)
    req = request(DOC + "long-running request?")
    busy = d.decide(req).endpoint  # in flight, not yet streaming: epp's own backlog there
    scorer = next(p for p in d.scheduler.plugins if isinstance(p, PrefillLoadScorer))
    probe = request("a short unrelated prompt")

    def cost() -> int:
        plan = d.dry_run(probe)
        assert plan.result is not None
        assert plan.state is not None
        return scorer.costs(plan.state, probe, plan.result.candidates)[plan.result.candidates.index(busy)]

    before = cost()
    # The scrape, taken with that request in flight, shows it.
    busy.metrics = EndpointMetrics(waiting=1, running=0, own_inflight=busy.inflight, scraped_at=NOW)
    assert cost() - before < len(DOC) // 4 // 2
