"""The exception types that mean "the user can fix this"."""

from __future__ import annotations


class ChargenError(Exception):
    """A problem with input, params, data or a model file that the user can fix.

    The message is one line that says what was wrong and what to do; stages and the
    CLI print it without a traceback and exit non-zero.
    """


class ModelError(ChargenError):
    """A model file is missing, unreadable, or not a chargen ONNX model."""
