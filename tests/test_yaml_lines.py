"""epp.yaml_lines: line numbers for errors, and duplicate keys refused as upstream's strict YAML decoding does."""

from __future__ import annotations

import pytest

from epp.scheduling import picker_config
from epp.yaml_lines import YamlError, load_documents, where

CONFIG = """\
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
- type: prefix-cache-scorer
  parameters:
    blockSizeTokens: 16
    lruCapacityPerServer: 1000
    blockSizeTokens: 64
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: queue-scorer
  - pluginRef: prefix-cache-scorer
"""


def test_mappings_and_lists_carry_their_line() -> None:
    (doc,) = load_documents(CONFIG.replace("    blockSizeTokens: 64\n", ""), "epp.yaml")
    assert where(doc["plugins"], "epp.yaml") == "epp.yaml:4"
    assert where(doc["plugins"][1]["parameters"], "epp.yaml") == "epp.yaml:7"
    assert doc["plugins"][1]["parameters"]["blockSizeTokens"] == 16


def test_a_duplicate_key_is_refused_with_its_file_and_line() -> None:
    with pytest.raises(YamlError, match=r"^epp\.yaml:9: duplicate key 'blockSizeTokens' \(first at line 7\)$"):
        load_documents(CONFIG, "epp.yaml")


def test_a_duplicate_key_in_a_later_document_names_its_own_line() -> None:
    text = "a: 1\n---\nkind: Pod\nmetadata:\n  name: x\n  name: y\n"
    with pytest.raises(YamlError, match=r"^pods\.yaml:6: duplicate key 'name'"):
        load_documents(text, "pods.yaml")


def test_the_same_key_in_different_mappings_is_fine() -> None:
    docs = load_documents("a: {name: 1}\nb: {name: 2}\nlist:\n- name: 3\n- name: 4\n", "f.yaml")
    assert [d["name"] for d in docs[0]["list"]] == [3, 4]


def test_a_config_with_a_duplicate_key_does_not_load(tmp_path) -> None:
    path = tmp_path / "epp.yaml"
    path.write_text(CONFIG)
    with pytest.raises(ValueError, match=r"epp\.yaml:9: duplicate key 'blockSizeTokens'"):
        picker_config.load_file(str(path))


def test_a_mapping_used_as_a_key_is_a_clear_error() -> None:
    with pytest.raises(YamlError, match=r"^epp\.yaml:2: a key must be a plain value, not dict$"):
        load_documents("plugins:\n- parameters: {{serverSpeed: true}}\n", "epp.yaml")
