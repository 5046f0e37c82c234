"""Reading a config file: a YAML mapping, with the line of every key for error messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from instructune.errors import UserError


class _LineLoader(yaml.SafeLoader):
    """A safe YAML loader that refuses duplicate keys and remembers the line of each top-level key."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark
                )
            seen[key] = line
        mapping = super().construct_mapping(node, deep=deep)
        if node is getattr(self, "_root", None):
            self.key_lines = seen
        return mapping

    def get_single_node(self):
        self._root = super().get_single_node()
        return self._root


def read_yaml_mapping(path: Path) -> tuple[dict, dict[str, int]]:
    """The mapping in a YAML file and the line of each key; UserError naming the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read config file {path}: {error}") from None
    loader = _LineLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of `key: value` lines, got {type(data).__name__}")
    return data, getattr(loader, "key_lines", {})
