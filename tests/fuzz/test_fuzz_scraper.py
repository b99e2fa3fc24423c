"""Fuzz the model-server metrics parser (epp.datalayer.scraper.extract): any text a server can send.

Series of the names each engine's mapping reads, with odd labels (quotes, escapes, duplicates,
any text), any value (NaN, ±Inf, huge, negative, not a number, hex), timestamps, stray comments,
and arbitrary lines around them. `extract` returns a snapshot or raises MetricsParseError, and
nothing else: any other exception would end that pod's scrape loop. A snapshot it returns has
counts that are non-negative integers and a finite, non-negative KV-cache usage.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from epp.datalayer.engines import ENGINES, EngineMapping
from epp.datalayer.scraper import MetricsParseError, extract
from epp.datastore import EndpointMetrics
from tests.fuzz.fuzz_strategies import fuzz_settings

NAMES = sorted({n for m in ENGINES.values() for n in m.names})
LABEL_NAMES = st.sampled_from(["model_name", "request_type", "kv_cache_block_type", "max_lora",
                               "running_lora_adapters", "waiting_lora_adapters", "le", "__name__", "0bad",
                               "a-b", ""]) | st.text(max_size=8)
LABEL_VALUES = st.sampled_from(["waiting", "scheduled", "fraction", "4", "a,b", "", "1e400", "9" * 5000, "-3",
                                'with "quotes"', "back\\slash", "new\nline", "\\n", "\\", "{", "}", ","]) | st.text(
    max_size=12)
VALUES = st.sampled_from(["0", "1", "3.0", "NaN", "nan", "+Inf", "-Inf", "Inf", "1e308", "1e309", "-1e309", "-0",
                          "-1", "0x1p3", "1_000", "", "one", "9" * 400, "4.9e-324", "1.7976931348623157e308",
                          "0.42", "250", "1e-320"]) | st.floats().map(repr) | st.integers().map(str)


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@st.composite
def series_line(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES) | st.sampled_from([n + "_total" for n in NAMES]) | st.text(max_size=10))
    labels = draw(st.lists(st.tuples(LABEL_NAMES, LABEL_VALUES), max_size=3))
    escape = draw(st.booleans())  # well-formed, or raw text where quotes and newlines break the line
    body = ",".join(f'{k}="{_escape(v) if escape else v}"' for k, v in labels)
    text = f"{name}{{{body}}}" if labels or draw(st.booleans()) else name
    text += " " + draw(VALUES)
    if draw(st.integers(0, 5)) == 0:
        text += " " + draw(st.sampled_from(["1700000000000", "-1", "x", "1e400"]))
    return text


COMMENTS = st.builds(lambda kind, name, rest: f"# {kind} {name} {rest}".rstrip(),
                     st.sampled_from(["TYPE", "HELP", "EOF", "UNIT", ""]), st.sampled_from(NAMES) | st.text(max_size=6),
                     st.sampled_from(["gauge", "counter", "histogram", "summary", "untyped", "info", "bogus", ""]))
LINES = st.one_of(series_line(), series_line(), COMMENTS, st.text(max_size=40), st.just(""))
TEXTS = st.lists(LINES, max_size=12).map("\n".join) | st.text(max_size=300)
MAPPINGS = st.sampled_from(sorted(ENGINES)).map(ENGINES.__getitem__)


def check_snapshot(m: EndpointMetrics, missing: list[str], mapping: EngineMapping) -> None:
    for count in (m.waiting, m.running, m.max_lora):
        assert isinstance(count, int)
        assert count >= 0
    assert isinstance(m.kv_usage, float | int)
    assert math.isfinite(m.kv_usage)
    assert m.kv_usage >= 0
    assert all(isinstance(a, str) and a for a in m.active_adapters | m.waiting_adapters)
    assert set(missing) <= mapping.names
    assert m.scraped_at == 7.0


@fuzz_settings(1500)
@given(text=TEXTS, mapping=MAPPINGS, trailing_newline=st.booleans())
def test_any_metrics_text_gives_a_snapshot_or_a_parse_error(text: str, mapping: EngineMapping,
                                                             trailing_newline: bool) -> None:
    try:
        m, missing = extract(text + ("\n" if trailing_newline else ""), mapping, now=7.0)
    except MetricsParseError:
        return
    check_snapshot(m, missing, mapping)




def test_an_integer_past_the_float_range_is_a_parse_error() -> None:
    text = 'vllm:num_requests_waiting{model_name="m"} 0\nvllm:kv_cache_usage_perc{model_name="m"} ' + "9" * 400 + "\n"
    with pytest.raises(MetricsParseError):
        extract(text, ENGINES["vllm"], now=7.0)


@fuzz_settings(300)
@given(queue=VALUES, running=VALUES, kv=VALUES, mapping=st.just(ENGINES["vllm"]))
def test_any_value_of_the_signals_a_pod_reports(queue: str, running: str, kv: str, mapping: EngineMapping) -> None:
    """A well-formed vLLM page whose three signals take any value: only a parse error or a sane snapshot."""
    text = (f'vllm:num_requests_waiting{{model_name="m"}} {queue}\n'
            f'vllm:num_requests_running{{model_name="m"}} {running}\n'
            f'vllm:kv_cache_usage_perc{{model_name="m"}} {kv}\n')
    try:
        m, missing = extract(text, mapping, now=7.0)
    except MetricsParseError:
        return
    check_snapshot(m, missing, mapping)
