"""The corpus: EndpointPickerConfigs in GIE v1.5's and llm-d-router v0.10's documented formats, each
with its verdict in its header. Valid ones load with what upstream would build; the ones epp
refuses (upstream's invalid configs, and the documented gaps) fail naming the marked line.

Header lines: `# expect: loads` or `# expect: refused`; for a refusal `# error: <text>` and a
line marked `# refused here`; for a load, optionally `# profile:`, `# filters:` (names in order),
`# scorers:` (name=weight in order), `# picker:`, `# detector: <type> key=value...`,
`# parsers:`, `# datalayer: key=value...` and `# warns: <text>`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from epp.errors import ConfigError
from epp.scheduling import picker_config
from epp.scheduling.picker_config import PickerConfig

CORPUS = sorted(Path(__file__).parent.glob("*.yaml"))


def header(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("# ") or ":" not in line:
            continue
        key, _, value = line[2:].partition(":")
        if key in ("expect", "error", "profile", "filters", "scorers", "picker", "detector", "parsers",
                   "datalayer", "warns"):
            out[key] = value.strip()
    return out


def test_the_corpus_covers_both_releases_and_both_verdicts() -> None:
    verdicts = {(p.name.split("-")[0], header(p.read_text())["expect"]) for p in CORPUS}
    assert verdicts == {("gie", "loads"), ("gie", "refused"), ("llm", "loads"), ("llm", "refused")}


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_verdict(path: Path) -> None:
    text = path.read_text()
    expect = header(text)
    assert expect.get("expect") in ("loads", "refused"), f"{path.name}: no '# expect:' header"
    if expect["expect"] == "refused":
        marked = [i for i, line in enumerate(text.splitlines(), 1) if line.rstrip().endswith("# refused here")]
        assert len(marked) == 1, f"{path.name}: mark the refused line with '# refused here'"
        with pytest.raises(ConfigError) as e:
            picker_config.load_text(text, path.name)
        message = str(e.value)
        assert message.startswith(f"{path.name}:{marked[0]}: "), message
        assert expect["error"] in message
        return
    check_loaded(picker_config.load_text(text, path.name, seed=1), expect)


def check_loaded(config: PickerConfig, expect: dict[str, str]) -> None:
    (profile,) = config.scheduler.profiles
    if "profile" in expect:
        assert profile.name == expect["profile"]
    if "filters" in expect:
        assert [f.name for f in profile.filters] == expect["filters"].split()
    if "scorers" in expect:
        assert [f"{ws.scorer.name}={ws.weight:g}" for ws in profile.scorers] == expect["scorers"].split()
    if "picker" in expect:
        assert profile.picker is not None
        assert profile.picker.name == expect["picker"]
    if "detector" in expect:
        kind, *settings = expect["detector"].split()
        assert config.saturation.type_name == kind
        described = {k: picker_config._value(v) for k, v in config.saturation.describe().items()}
        for setting in settings:
            key, _, value = setting.partition("=")
            assert described[key] == value, (key, described)
    if "parsers" in expect:
        assert config.parsers.names() == expect["parsers"].split()
    if "datalayer" in expect:
        described = {k: picker_config._value(v) for k, v in config.data_layer.describe().items()}
        for setting in expect["datalayer"].split():
            key, _, value = setting.partition("=")
            assert described.get(key) == value, (key, described)
    if "warns" in expect:
        assert any(expect["warns"] in w for w in config.warnings), config.warnings
