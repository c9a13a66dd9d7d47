"""One YAML loader for every config, override, run-config, constitution and prompt file.

PyYAML implements YAML 1.1, where ``5e-5`` (no dot) is a *string*; YAML 1.2 (and every
user) reads it as a number. :func:`load_yaml` is ``yaml.safe_load`` plus the YAML 1.2
float forms, so ``learning_rate: 5e-5`` and ``-o dpo.learning_rate=5e-5`` give ``5e-05``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

#: YAML 1.2 core-schema floats (plus the 1.1 forms PyYAML already reads): ``1e-5``, ``5E3``, ``.5``, ``1.``
_FLOAT_RE = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class Yaml12SafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also resolves YAML 1.2 floats such as ``5e-5`` and refuses a key
    given twice in one mapping (YAML forbids it; PyYAML kept the last, so a second ``dpo:`` section
    silently replaced the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<' merge keys may be overridden by the mapping's own keys
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping", node.start_mark, f"key {key!r} given twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


Yaml12SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))

_SURROGATE = re.compile("[\ud800-\udfff]")


def _construct_str(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    """A string, with ``"\\ud83d\\ude00"``-style surrogate pairs joined into their character; a lone
    surrogate escape (``"\\ud800"``) is no text (UTF-8 cannot encode it) and raises, at its line."""
    value = loader.construct_scalar(node)
    if _SURROGATE.search(value) is None:
        return value
    try:
        return value.encode("utf-16-le", "surrogatepass").decode("utf-16-le")
    except UnicodeDecodeError:
        raise yaml.constructor.ConstructorError(
            None, None, "a lone UTF-16 surrogate escape is not text", node.start_mark
        ) from None


Yaml12SafeLoader.add_constructor("tag:yaml.org,2002:str", _construct_str)

YAMLError = yaml.YAMLError


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: ``line L, column C: problem (context)``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).split("\n")[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def load_yaml(text: str) -> Any:
    """Parse YAML text safely (no object construction), with YAML 1.2 floats.

    Raises ``yaml.YAMLError`` on malformed text; callers re-raise it naming the file.
    """
    return yaml.load(text, Loader=Yaml12SafeLoader)  # noqa: S506 - a SafeLoader subclass
