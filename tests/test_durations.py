"""Go-style durations (epp.durations) as the Go EPP's flags and configs write them (Go's time.ParseDuration).

A duration is a sequence of decimal numbers, each with an optional fraction and a unit
(ns, us or µs, ms, s, m, h); "0" alone needs no unit. epp also takes a bare number as
seconds (YAML configs give numbers).
"""

from __future__ import annotations

import pytest

from epp.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("50ms", 0.05),
        ("1.5s", 1.5),
        ("1m30s", 90.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("2h45m", 9900.0),
        ("1.5h", 5400.0),
        ("300us", 300e-6),
        ("300\u00b5s", 300e-6),  # MICRO SIGN, as Go's unit table has it
        ("10ns", 10e-9),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_go_duration_strings(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize(("value", "seconds"), [("2", 2.0), ("0.25", 0.25), (2, 2.0), (0.5, 0.5)])
def test_a_bare_number_is_seconds(value: str | float, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "ms", "s5", "1d", "5x", "1 s", "1.5.5s", "1s2", "--1s", "1m30", "fast"],
)
def test_bad_strings_are_rejected_naming_the_value_and_the_form(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected e\.g\. 50ms, 2s, 1m30s") as e:
        parse_duration(text)
    assert repr(text) in str(e.value)


@pytest.mark.parametrize("value", [True, None, [1]])
def test_non_strings_that_are_not_numbers_are_rejected(value: object) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "seconds"), [(".5s", 0.5), ("5.s", 5.0), ("1\u03bcs", 1e-6)])
def test_go_duration_strings_with_a_bare_point_or_greek_mu(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["nan", "inf", "-5"])
def test_bare_numbers_that_are_no_duration_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)
