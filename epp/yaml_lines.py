"""YAML loading that remembers where each mapping and list came from, for errors that name the line.

Operators edit these files by hand; "pool.yaml:14: weight must be ..." beats a
traceback. Mappings and lists carry `.line` (1-based); scalars are plain values. A key given
twice in one mapping is refused with both lines, as upstream's strict decoding refuses it.
"""

from __future__ import annotations

from typing import Any

import yaml


class LineDict(dict):
    line = 0


class LineList(list):
    line = 0


class YamlError(ValueError):
    """The text is not valid YAML; the message names the source."""


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _to_python(node: yaml.Node, constructor: yaml.SafeLoader, source: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        d = LineDict()
        d.line = node.start_mark.line + 1
        first_line: dict[Any, int] = {}
        for k, v in node.value:
            key = _to_python(k, constructor, source)
            if k.tag != _MERGE_TAG:
                try:
                    seen = first_line.get(key)
                except TypeError:  # a mapping or list used as a key, as in `{{a: 1}}`
                    raise YamlError(f"{source}:{k.start_mark.line + 1}: a key must be a plain value, "
                                    f"not {type(key).__name__.removeprefix('Line').lower()}") from None
                if seen is not None:
                    # As upstream's strict decoding (sigs.k8s.io/yaml): a key given twice is an error, not
                    # the last value silently winning.
                    raise YamlError(f"{source}:{k.start_mark.line + 1}: duplicate key {key!r} "
                                    f"(first at line {seen})")
                if isinstance(key, str | int | float | bool) or key is None:
                    first_line[key] = k.start_mark.line + 1
            d[key] = _to_python(v, constructor, source)
        return d
    if isinstance(node, yaml.SequenceNode):
        seq = LineList(_to_python(v, constructor, source) for v in node.value)
        seq.line = node.start_mark.line + 1
        return seq
    return constructor.construct_object(node, deep=True)


def load_documents(text: str, source: str) -> list[Any]:
    """Every document of a (multi-document) YAML text, with line numbers; empty documents dropped."""
    constructor = yaml.SafeLoader("")
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
        return [_to_python(n, constructor, source) for n in nodes if n is not None]
    except yaml.YAMLError as e:
        raise YamlError(f"{source}: not valid YAML: {e}") from None
    finally:
        constructor.dispose()


def where(obj: Any, source: str) -> str:
    """'source:line' for a loaded mapping or list, else just the source."""
    line = getattr(obj, "line", 0)
    return f"{source}:{line}" if line else source
