"""The project's own error types for bad input.

Every error caused by what a user gave (a config file or key, an override, a prompt file,
a constitution, a label export, a preference dataset, a command-line argument) derives
from :class:`CaiDpoInputError`. The command line turns exactly these into a one-line
``error: …`` message and a non-zero exit; anything else is a bug and shows as one.
"""

from __future__ import annotations


class CaiDpoInputError(ValueError):
    """Bad input; the message names the file (or argument) and the field, and the fix."""


class InputError(CaiDpoInputError):
    """Bad input that has no more specific error type (a stage's data, an argument)."""


class ContextLengthError(CaiDpoInputError):
    """A prompt does not fit the model's context.

    ``index`` is the position of the offending conversation in the call that raised, so a
    caller holding the prompts can name the file, the line and the prompt id.
    """

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index
