"""Errors a user can act on. Each carries one line that says what went wrong and what to do."""

from __future__ import annotations


class QwenrunError(Exception):
    """Base class: the CLI prints these as one line and exits non-zero."""


class CheckpointError(QwenrunError):
    """The checkpoint folder is missing files, holds unreadable/corrupt files, or tensors don't fit the model."""


class UnsupportedModelError(QwenrunError):
    """config.json names an architecture qwenrun does not implement."""


class ContextLengthError(QwenrunError):
    """A prompt (plus the tokens asked for) does not fit the model's context window."""


class InvalidRequestError(QwenrunError, ValueError):
    """Bad sampling parameters, messages or tool schemas.

    `param` names the offending field (OpenAI's `error.param`) when one field is to blame.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestFailedError(QwenrunError):
    """The engine failed while serving this one request (a bug, logged with its traceback).

    Only this request is failed; the engine and every other request carry on.
    """
