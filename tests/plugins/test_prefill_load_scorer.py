"""prefill-load-scorer: a prefix holder busy prefilling a long prompt loses, until that prompt streams."""

from __future__ import annotations

import random
from dataclasses import replace

import orjson
import pytest

from epp.datastore import EndpointMetrics
from epp.errors import ConfigError
from epp.scheduling import server_speed
from epp.scheduling.framework import SchedulingResult
from epp.scheduling.picker_config import load_text
from epp.scheduling.plugins.prefill_load_scorer import PrefillLoadScorer
from epp.scheduling.plugins.prefix_cache_scorer import PrefixCacheScorer
from epp.server import EppServer
from tests.extproc_messages import (
    SSE_HEADERS,
    Stream,
    body_msg,
    completion,
    dest_header,
    headers_msg,
    response_body_msg,
    response_headers_msg,
)
from tests.helpers import NOW, cycle_state, endpoint, request, until

DOC = "a long shared document. " * 500  # ~3000 tokens at 4 characters a token


def bound() -> tuple[PrefixCacheScorer, PrefillLoadScorer]:
    prefix, load = PrefixCacheScorer("prefix-cache-scorer"), PrefillLoadScorer()
    load.bind({"prefix-cache-scorer": prefix}.get)
    return prefix, load


def send(prefix: PrefixCacheScorer, load: PrefillLoadScorer, req, eps, to: int) -> None:
    """What the director does once a pick is made: every PreRequest plugin is told."""
    st = cycle_state()
    load.score(st, req, eps)
    result = SchedulingResult([eps[to]], eps)
    prefix.pre_request(st, req, result)
    load.pre_request(st, req, result)


def test_holder_wins_then_loses_while_busy_then_wins_again() -> None:
    prefix, load = bound()
    eps = [endpoint(1), endpoint(2)]
    first = request(DOC + "first question?")
    send(prefix, load, first, eps, to=0)
    load.response_started(request(), eps[0])  # not that request: nothing is released
    # The first request is still prefilling on endpoint 1: its ~3000 tokens are endpoint 1's backlog.
    assert load.backlog == {eps[0].hostport: pytest.approx(len(DOC) // 4, abs=10)}

    # A second, unrelated long prompt: endpoint 2 is idle, endpoint 1 would queue it behind the first.
    other = request("an unrelated document. " * 500)
    assert load.score(cycle_state(), other, eps) == [0.0, 1.0]

    # A question on the same document: endpoint 1 holds the document but is busy prefilling it;
    # the costs are ~equal (3000 backlog + 0 vs 0 backlog + 3000), so neither is pushed away.
    q = request(DOC + "second question?")
    s = load.score(cycle_state(), q, eps)
    assert abs(s[0] - s[1]) < 0.05

    # The first request starts streaming: its prefill is done, endpoint 1 is clearly best again.
    load.response_started(first, eps[0])
    assert load.backlog == {}
    assert load.score(cycle_state(), q, eps) == [1.0, 0.0]
    load.response_complete(first, eps[0])  # completion after start releases nothing twice
    assert load.backlog == {}


def test_backlog_released_at_completion_without_a_first_byte() -> None:
    """A proxy that sends no response body (response_body_mode NONE) still releases at the end."""
    prefix, load = bound()
    eps = [endpoint(1), endpoint(2)]
    req = request(DOC)
    send(prefix, load, req, eps, to=1)
    assert eps[1].hostport in load.backlog
    load.response_complete(req, eps[1])
    assert load.backlog == {}


def test_small_differences_stay_small() -> None:
    """Costs of 25 and 50 tokens differ by far less than tokenScale: both score near 1."""
    _, load = bound()
    eps = [endpoint(1), endpoint(2)]
    short = request("x" * 100)
    send(*bound(), short, eps, to=0)
    load.backlog = {eps[1].hostport: 25}
    scores = load.score(cycle_state(), short, eps)
    assert scores[0] == 1.0
    assert 0.97 < scores[1] < 1.0


def test_without_a_prefix_scorer_every_endpoint_prefills_the_whole_prompt() -> None:
    load = PrefillLoadScorer()
    load.bind({}.get)
    eps = [endpoint(1), endpoint(2)]
    load.backlog = {eps[0].hostport: 5000}
    assert load.score(cycle_state(), request(DOC), eps) == [0.0, 1.0]


def test_removed_endpoint_forgets_its_backlog() -> None:
    prefix, load = bound()
    eps = [endpoint(1), endpoint(2)]
    req = request(DOC)
    send(prefix, load, req, eps, to=0)
    load.endpoints_changed([], [eps[0]])
    assert load.backlog == {}
    load.response_complete(req, eps[0])  # the late release of a vanished endpoint's request is harmless
    assert load.backlog == {}


CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefill-load-scorer
  parameters: {prefixScorer: queue-scorer}
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefill-load-scorer
  - pluginRef: max-score-picker
"""


def test_prefix_scorer_reference_must_be_a_prefix_scorer() -> None:
    with pytest.raises(ConfigError, match="not a prefix-cache-scorer"):
        load_text(CONFIG, "test")
    with pytest.raises(ConfigError, match="tokenScale"):
        load_text(CONFIG.replace("prefixScorer: queue-scorer", "tokenScale: 0"), "test")


async def test_first_response_byte_releases_the_backlog_over_grpc(epp: EppServer) -> None:
    """Through the ext_proc stream: released at the first response chunk, before the response ends."""
    load = next(p for p in epp.picker_config.scheduler.plugins if isinstance(p, PrefillLoadScorer))
    stream = Stream(epp)
    stream.send(headers_msg(), body_msg(completion("long prompt " * 300)))
    await stream.read()  # BUFFERED: the headers are acknowledged first
    [routed] = await stream.read()
    dest = dest_header(routed.request_body.response)
    assert load.backlog.get(dest, 0) > 800
    stream.send(SSE_HEADERS)
    await stream.read()
    assert load.backlog.get(dest, 0) > 800  # headers alone say nothing about prefill
    stream.send(response_body_msg(b'data: {"choices":[]}\n\n'))
    await stream.read()
    assert load.backlog.get(dest, 0) == 0
    assert epp.datastore.get(dest).inflight == 1  # still streaming
    stream.close()


def test_new_prefixes_spread_over_the_pool_cache_but_holders_pay_nothing() -> None:
    """A prompt no server holds goes to the server whose cache epp has filled least (as a tie-break)."""
    prefix, load = bound()
    eps = [endpoint(1), endpoint(2)]
    for i in range(3):  # endpoint 1 was sent three documents, endpoint 2 one
        send(prefix, load, request(f"document {i}. " * 300), eps, to=0)
    send(prefix, load, request("document 9. " * 300), eps, to=1)
    for ep in eps:
        load.backlog.pop(ep.hostport, None)  # all of them have started streaming
    load._pending.clear()
    new = load.score(cycle_state(), request("a new document. " * 300), eps)
    assert new[1] > new[0]
    assert new[0] > 0.4  # a tie-break, not a verdict: at most occupancyTokens / tokenScale apart
    # A question on a document endpoint 1 holds still goes there, however full its cache.
    assert load.score(cycle_state(), request("document 2. " * 300 + "question?"), eps) == [1.0, 0.0]


def test_an_endpoint_holding_the_adapter_saves_its_load() -> None:
    _, load = bound()
    eps = [endpoint(1, max_lora=4), endpoint(2, max_lora=4, active=("sql-lora",)), endpoint(3, max_lora=4)]
    # The only difference is the load (2048 tokens by default, over tokenScale): the holder scores 1, the rest 0.
    assert load.score(cycle_state(), request("a short question", model="sql-lora"), eps) == [0.0, 1.0, 0.0]
    # A base model (no scrape shows it as an adapter): no endpoint pays a load.
    assert load.score(cycle_state(), request("a short question", model="m"), eps) == [1.0, 1.0, 1.0]


def test_a_pick_holds_the_adapter_until_the_next_scrape_says_otherwise() -> None:
    """Between scrapes epp trusts its own picks: the endpoint it sent the adapter to is loading it."""
    prefix, load = bound()
    eps = [endpoint(1, max_lora=4), endpoint(2, max_lora=4, active=("sql-lora",)), endpoint(3, max_lora=4)]
    q = request("a short question", model="sql-lora")
    send(prefix, load, q, eps, to=0)
    load.response_started(q, eps[0])
    # Both hold it (endpoint 1 also holds the prompt's few tokens now, hence approx).
    assert load.score(cycle_state(), q, eps) == [1.0, pytest.approx(1.0, abs=0.01), 0.0]
    # Endpoint 1's next scrape does not show the adapter (evicted, or the request failed): no longer held.
    eps[0].metrics = endpoint(1, max_lora=4, age=-0.05).metrics
    later = cycle_state(NOW + 0.1)
    assert load.score(later, q, eps) == [pytest.approx(0.0, abs=0.01), 1.0, 0.0]


def test_base_model_picks_are_not_remembered_as_adapters() -> None:
    prefix, load = bound()
    eps = [endpoint(1, max_lora=4), endpoint(2, max_lora=4, active=("sql-lora",))]
    send(prefix, load, request("hello", model="m"), eps, to=0)
    assert load._adapters_sent == {}


def scraped(**kw: float) -> PrefillLoadScorer:
    load = PrefillLoadScorer(scraped_load=True, occupancy_tokens=0, **kw)  # type: ignore[arg-type]
    load.bind({"prefix-cache-scorer": PrefixCacheScorer("prefix-cache-scorer")}.get)
    return load


def test_scraped_load_counts_the_queue_others_sent_and_kv_pressure_in_tokens() -> None:
    from epp.datastore import EndpointMetrics

    load = scraped(running_request_tokens=100, kv_cache_threshold=0.8, kv_cache_tokens=4000)
    queued, full, idle = endpoint(1), endpoint(2), endpoint(3)
    queued.metrics = EndpointMetrics(waiting=2, running=3, scraped_at=NOW)  # 3 running, none epp's
    full.metrics = EndpointMetrics(kv_usage=0.9, scraped_at=NOW)  # halfway from the threshold to full
    q = request("x" * 40)  # 10 tokens, uncached everywhere
    costs = load.costs(cycle_state(), q, [queued, full, idle])
    assert costs == [2 * 1024 + 3 * 100 + 10, 2000 + 10, 10]  # tokens per request starts at tokenScale
    # Scraped while the running three were epp's own: their prefill is epp's backlog, not counted again.
    queued.metrics = replace(queued.metrics, own_inflight=3)
    queued.inflight = 3
    assert load.costs(cycle_state(), request("y" * 40), [queued])[0] == 2 * 1024 + 10


def test_scraped_load_does_not_take_epps_requests_that_ended_since_the_scrape_for_other_clients() -> None:
    from epp.datastore import EndpointMetrics

    load = scraped(running_request_tokens=100)
    holder, other = endpoint(1), endpoint(2)
    # The scrape showed four requests, all epp's; they have all ended since (inflight 0 now): the
    # holder's queue is empty, not four requests of some other client.
    holder.metrics = EndpointMetrics(waiting=0, running=4, own_inflight=4, scraped_at=NOW)
    other.metrics = EndpointMetrics(scraped_at=NOW)
    costs = load.costs(cycle_state(), request("x" * 40), [holder, other])
    assert costs == [10, 10]
    # A request another client sent shows as the scrape's count beyond epp's own at the time.
    holder.metrics = replace(holder.metrics, running=5)
    assert load.costs(cycle_state(), request("z" * 40), [holder, other])[0] == 100 + 10


def test_scraped_load_treats_unknown_or_stale_metrics_as_busy() -> None:
    load = scraped(unknown_metrics_tokens=5000)
    eps = [endpoint(1, waiting=None), endpoint(2, age=10.0), endpoint(3)]
    costs = load.costs(cycle_state(), request("x" * 40), eps)
    assert costs == [5010, 5010, 10]


def test_scraped_load_parameters_need_scraped_load() -> None:
    with pytest.raises(ConfigError, match="only with scrapedLoad"):
        load_text(CONFIG.replace("prefixScorer: queue-scorer", "kvCacheTokens: 10"), "test")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def timed(clock: Clock, **kw: object) -> tuple[PrefixCacheScorer, PrefillLoadScorer]:
    prefix = PrefixCacheScorer("prefix-cache-scorer")
    load = PrefillLoadScorer(server_speed=True, occupancy_tokens=0, clock=clock, **kw)  # type: ignore[arg-type]
    load.bind({"prefix-cache-scorer": prefix}.get)
    return prefix, load


def streamed(prompt: str, status: int = 200):  # type: ignore[no-untyped-def]
    """A streamed request whose response headers came back with `status`."""
    req = request(prompt)
    req.stream = True
    req.response_status = status
    return req


def serve(clock: Clock, prefix: PrefixCacheScorer, load: PrefillLoadScorer, eps, to: int, prompt: str,
          ms_per_token: float) -> None:
    """Send one streamed request to eps[to], a tenth of a second after the last; its first byte comes
    after its work at that speed."""
    clock.t += 0.1
    req = streamed(prompt)
    send(prefix, load, req, eps, to)
    _, _, work, _ = load._pending[id(req)]
    clock.t += (512 + work) * ms_per_token / 1000
    req.response_status = 200
    load.response_started(req, eps[to])
    load.response_complete(req, eps[to])


def test_a_slower_server_loses_a_prefix_that_a_faster_one_also_holds() -> None:
    """During a node rollout one pod takes twice as long per token: where both hold the prompt, the
    fast one wins; with like servers the same two are a tie, as without the estimate."""
    clock = Clock()
    prefix, load = timed(clock)
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    q = DOC + "a question?"
    for i in range(server_speed.MIN_SAMPLES):  # every server has answered enough of epp's streamed requests
        for to, speed in ((0, 0.05), (1, 0.025), (2, 0.025)):
            serve(clock, prefix, load, eps, to, f"document {i} for {to}. " * 50, speed)
    assert set(load.speeds.relative) == {eps[0].hostport}
    assert load.speeds.relative[eps[0].hostport] == pytest.approx(2.0, rel=0.05)
    for to in (0, 1):
        serve(clock, prefix, load, eps, to, q, 0.025 if to else 0.05)
    scores = load.score(cycle_state(), request(q), eps)
    assert scores[1] == 1.0
    assert scores[0] < scores[1]
    # A slow server's cost, step included, is its relative speed times the fast one's.
    costs = load.costs(cycle_state(), request(q), eps)
    assert costs[0] == pytest.approx(2.0 * (512 + costs[1]) - 512, abs=2)


def test_a_prefix_in_demand_moves_off_a_slow_server_that_alone_holds_it() -> None:
    """Request by request, staying on the slow holder is cheaper than prefilling the document again;
    once the document has been asked for often, its coming requests' extra time there outweighs one
    copy on a fast server, and after that the fast copy serves it."""
    clock = Clock()
    prefix, load = timed(clock)
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    for i in range(server_speed.MIN_SAMPLES):
        for to, speed in ((0, 0.05), (1, 0.025), (2, 0.025)):
            serve(clock, prefix, load, eps, to, f"document {i} for {to}. " * 50, speed)
    serve(clock, prefix, load, eps, 0, DOC, 0.05)  # it read the document before it was known as slow
    picks = []
    for i in range(30):  # a popular document only the slow server holds, asked for every half second
        q = request(DOC + f"question {i}?")
        scores = load.score(cycle_state(), q, eps)
        to = scores.index(max(scores))
        picks.append(to)
        clock.t += 0.4
        serve(clock, prefix, load, eps, to, DOC + f"question {i}?", 0.05 if to == 0 else 0.025)
    moved = picks.index(1) if 1 in picks else picks.index(2)
    assert 1 <= moved < 20
    assert set(picks[:moved]) == {0}
    assert set(picks[moved:]) == {picks[moved]}  # moved once, and stays on the fast copy
    # A document nobody has asked for since the first time stays on the slow server that holds it.
    serve(clock, prefix, load, eps, 0, "a rare document. " * 400, 0.05)
    rare = load.score(cycle_state(), request("a rare document. " * 400 + "?"), eps)
    assert rare[0] == 1.0


def test_a_busy_server_of_the_same_speed_is_not_judged_slow() -> None:
    """Requests that meet a queue (epp's own prefill there, or waiting requests in the scrape) do not
    time the server: their wait says how busy it is, which the backlog already counts, not its speed."""
    clock = Clock()
    prefix, load = timed(clock)
    eps = [endpoint(1), endpoint(2)]
    per_token = 0.025 / 1000
    for i in range(server_speed.MIN_SAMPLES):
        clock.t += 0.1
        busy, question = streamed(f"a long document {i}. " * 400), streamed(f"question {i}. " * 20)
        send(prefix, load, busy, eps, to=0)
        send(prefix, load, question, eps, to=0)  # behind the long document's prefill: not timed
        assert load._pending[id(question)][3] is None
        sent = clock.t
        clock.t = sent + (512 + load._pending[id(busy)][2]) * per_token
        load.response_started(busy, eps[0])
        clock.t += 1.0  # however long it waited
        load.response_started(question, eps[0])
        serve(clock, prefix, load, eps, 1, f"other {i}. " * 20, 0.025)
    assert load.speeds.relative == {}
    eps[0].metrics = EndpointMetrics(waiting=3, scraped_at=NOW)  # a queue epp did not send
    queued = streamed("one more question. " * 20)
    send(prefix, load, queued, eps, to=0)
    assert load._pending[id(queued)][3] is None


def test_like_servers_with_noisy_timings_route_as_without_the_estimate() -> None:
    clock = Clock()
    prefix, load = timed(clock)
    eps = [endpoint(1), endpoint(2), endpoint(3)]
    for i in range(2 * server_speed.MIN_SAMPLES):
        for to, speed in ((0, 0.028), (1, 0.025), (2, 0.022)):  # within the 25% tolerance
            serve(clock, prefix, load, eps, to, f"document {i} for {to}. " * 50, speed)
    assert load.speeds.relative == {}
    plain_prefix, plain = bound()
    plain.occupancy_tokens = 0
    for p, pl in ((prefix, load), (plain_prefix, plain)):
        send(p, pl, request(DOC), eps, to=2)
    assert load.score(cycle_state(), request(DOC + "?"), eps) == plain.score(cycle_state(), request(DOC + "?"), eps)


def test_erratic_timings_take_more_requests_to_judge_and_like_servers_never_look_slow() -> None:
    """Single timings scatter (batch make-up, network, cache misses): a server twice as slow is found once its
    timings show it beyond the tolerance with confidence, later than with steady timings; like
    servers with the same scatter are never judged off the pool's speed."""
    rng = random.Random(7)

    def rounds(speeds: tuple[float, ...], n: int, scatter: float, misses: int = 0) -> list[set[str]]:
        clock = Clock()
        prefix, load = timed(clock)
        eps = [endpoint(i + 1) for i in range(len(speeds))]
        seen = []
        for i in range(n):
            for to, speed in enumerate(speeds):
                miss = 10.0 if to == 0 and misses and i % misses == 0 else 1.0  # a prefix it had evicted
                serve(clock, prefix, load, eps, to, f"document {i} for {to}. " * 50,
                      miss * speed * rng.lognormvariate(0.0, scatter))
            seen.append({eps.index(e) for e in eps if e.hostport in load.speeds.relative})
        return seen

    steady = rounds((0.05, 0.025, 0.025, 0.025), 40, 0.0)
    erratic = rounds((0.05, 0.025, 0.025, 0.025), 40, 0.4)
    assert steady.index({0}) == server_speed.MIN_SAMPLES - 1  # as soon as it has enough timings
    assert server_speed.MIN_SAMPLES - 1 < erratic.index({0}) < 30
    assert all(s == {0} for s in erratic[erratic.index({0}):])
    assert all(s == set() for s in rounds((0.025, 0.025, 0.025, 0.025), 150, 0.4))
    # A like server whose every third request takes ten times as long (a prefix epp took as cached had
    # been evicted there) is not slow: the median of its timings is the pool's.
    assert all(s == set() for s in rounds((0.025, 0.025, 0.025, 0.025), 150, 0.2, misses=3))


def test_only_successful_streamed_responses_are_timed_and_old_estimates_expire() -> None:

    clock = Clock()
    prefix, load = timed(clock)
    eps = [endpoint(1), endpoint(2)]
    for i in range(10):  # not streamed: the first byte is the whole answer, says nothing of prefill
        req = request(f"document {i}. " * 50)
        req.response_status = 200
        send(prefix, load, req, eps, to=i % 2)
        clock.t += 5.0 if i % 2 == 0 else 0.01
        load.response_started(req, eps[i % 2])
    for i in range(10):  # a server failing at once is not fast: its error bodies are not timed
        req = streamed(f"failing {i}. " * 50, status=503)
        send(prefix, load, req, eps, to=0)
        clock.t += 0.001
        load.response_started(req, eps[0])
    assert load.speeds._samples == {}
    for i in range(server_speed.MIN_SAMPLES):
        serve(clock, prefix, load, eps, 0, f"slow {i}. " * 50, 0.1)
        serve(clock, prefix, load, eps, 1, f"fast {i}. " * 50, 0.025)
    assert eps[0].hostport in load.speeds.relative
    # No request reaches it for a minute: it gets tried again at the pool's speed.
    clock.t += server_speed.MAX_AGE + 1
    serve(clock, prefix, load, eps, 1, "fast again. " * 50, 0.025)
    assert load.speeds.relative == {}


def test_server_speed_parameters_need_server_speed() -> None:
    with pytest.raises(ConfigError, match="only with serverSpeed"):
        load_text(CONFIG.replace("prefixScorer: queue-scorer", "stepTokens: 10"), "test")
    cfg = load_text(CONFIG.replace("{prefixScorer: queue-scorer}",
                                   "{serverSpeed: true, stepTokens: 100, speedTolerance: 0.1}"), "test")
    load = next(p for p in cfg.scheduler.plugins if isinstance(p, PrefillLoadScorer))
    assert load.speeds is not None
    assert (load.speeds.step_tokens, load.speeds.tolerance) == (100, 0.1)


async def test_a_slow_server_is_learned_from_streamed_responses_over_grpc(start_epp, caplog) -> None:  # type: ignore[no-untyped-def]
    """Through the ext_proc stream: each response's first chunk times its request; the server whose
    first chunks come twice as late is found slow, and error responses time nothing."""
    epp = await start_epp(refresh_metrics_interval=3600.0)  # one scrape each, which fails: no pod listens
    await until(lambda: caplog.text.count("cannot read metrics") >= 3, what="the first scrapes")
    load = next(p for p in epp.picker_config.scheduler.plugins if isinstance(p, PrefillLoadScorer))
    assert load.speeds is not None  # on in the default profile
    clock = Clock()
    load.clock = load.speeds.clock = load.demand.clock = clock
    servers = sorted(ep.hostport for ep in epp.datastore.all_endpoints())

    async def one(to: str, prompt: str, seconds: float, status: int = 200) -> None:
        for ep in epp.datastore.all_endpoints():  # a fresh scrape, no queue (a failed scrape keeps it)
            ep.metrics = EndpointMetrics(scraped_at=epp.datastore.now())
        stream = Stream(epp)
        body = orjson.dumps({"model": "m", "prompt": prompt, "max_tokens": 4, "stream": True})
        stream.send(headers_msg(subset=[to]), body_msg(body))
        await stream.read()
        [routed] = await stream.read()
        assert dest_header(routed.request_body.response) == to
        clock.t += seconds
        stream.send(response_headers_msg(status, "text/event-stream"))
        await stream.read()
        stream.send(response_body_msg(b'data: {"choices":[]}\n\n'))
        await stream.read()
        stream.close()
        clock.t += 0.2

    for i in range(server_speed.MIN_SAMPLES):  # the first server fails at once: not taken as fast
        await one(servers[0], f"failing {i} " * 40, 0.001, status=503)
    assert load.speeds._samples == {}
    for i in range(server_speed.MIN_SAMPLES):
        for k, to in enumerate(servers):
            await one(to, f"prompt {i} for {k} " * 40, 0.1 if k == 0 else 0.05)
    assert set(load.speeds.relative) == {servers[0]}
