"""Metric names per engine (epp.datalayer.engines), and the flags that override them."""

from epp.datalayer.engines import ENGINES, parse_spec, with_overrides
from epp.datalayer.scraper import extract


def test_metric_name_flags_override() -> None:
    mapping = with_overrides(ENGINES["vllm"], queue="custom:queue")
    m, _ = extract("custom:queue 9\nvllm:num_requests_running 1\n", mapping, now=0)
    assert m.waiting == 9
    assert parse_spec("a{b=c, d=\"e\"}").labels == (("b", "c"), ("d", "e"))
