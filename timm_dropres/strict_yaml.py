"""YAML read strictly: a key written twice in one mapping is an error, not "the last one wins".

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, so ``lr: 0.1`` ... ``lr: 0.001``
in one recipe silently trains at 0.001. :class:`StrictSafeLoader` is PyYAML's ``SafeLoader`` with one
check added where mappings are built; PyYAML has no option for it. Merge keys (``<<: *base``) still
override as the YAML spec says: only keys written out twice are refused.
"""
from __future__ import annotations

from typing import Any, Dict, Hashable

import yaml

__all__ = ['StrictSafeLoader', 'safe_load_strict']

_MERGE_TAG = 'tag:yaml.org,2002:merge'


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice (a ``ConstructorError``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: Dict[Hashable, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    seen = key in first
                except TypeError:  # an unhashable key: SafeLoader reports it itself
                    continue
                if not seen:
                    first[key] = key_node.start_mark.line + 1
                else:
                    line = first[key]
                    shown = repr(key) if len(repr(key)) <= 60 else repr(key)[:60] + '...'
                    raise yaml.constructor.ConstructorError(
                        'while constructing a mapping', node.start_mark,
                        f'the key {shown} is given twice (first on line {line}); remove one of them',
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def safe_load_strict(text: str) -> Any:
    """``yaml.safe_load`` with duplicate keys refused (see :class:`StrictSafeLoader`).

    Raises:
        yaml.YAMLError: invalid YAML, or a mapping with a key given twice.
    """
    return yaml.load(text, Loader=StrictSafeLoader)  # noqa: S506 - a SafeLoader subclass
