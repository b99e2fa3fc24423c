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


def test_match_length_weight_rewards_a_long_absolute_match() -> None:
    """llm-d-router: (1 - w) * match ratio + w * min(1, matched tokens / matchLengthScaleTokens)^2."""
    from epp.scheduling.params import Params

    scorer = PrefixCacheScorer.from_parameters("p", Params("prefix-cache-scorer", {
        "matchLengthWeight": 0.5, "matchLengthScaleTokens": 64}))
    scorer.bind({}.get)  # a private index: no producer configured
    eps = [endpoint(1), endpoint(2)]
    prompt = "0123456789abcdef" * 16  # 256 characters, 4 blocks of 16 tokens
    scorer.pre_request(cycle_state(), request(prompt), SchedulingResult([eps[0]], eps))  # type: ignore[attr-defined]
    # Two of four blocks held: ratio 0.5; 32 tokens of 64: 0.25 squared.
    half = prompt[:128] + "X" * 128
    assert scorer.score(cycle_state(), request(half), eps) == [0.5 * 0.25 + 0.5 * 0.5, 0.0]  # type: ignore[attr-defined]


def test_scorers_without_index_parameters_share_one_producer() -> None:
    from epp.scheduling.picker_config import load_text

    cfg = load_text("""\
plugins:
- {type: prefix-cache-scorer, name: a}
- {type: prefix-cache-scorer, name: b}
schedulingProfiles:
- name: p
  plugins: [{pluginRef: a}, {pluginRef: b}]
""")
    a, b = (ws.scorer for ws in cfg.scheduler.profiles[0].scorers)
    assert a.producer is b.producer  # type: ignore[attr-defined]
    assert a.producer.type_name == "approx-prefix-cache-producer"  # type: ignore[attr-defined]
    assert a.producer in cfg.scheduler.plugins  # type: ignore[attr-defined]  # it gets the hooks itself
