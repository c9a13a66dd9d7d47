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
    """``yaml.SafeLoader`` that also resolves YAML 1.2 floats such as ``5e-5``."""


Yaml12SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))

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
