"""Errors raised by the queue core, mapped from the SQLSTATEs its SQL raises."""

from __future__ import annotations

import psycopg


class QueueError(Exception):
    """Base class: a refused queue operation (the caller's fault, not a bug)."""


class UnknownModel(QueueError):
    pass


class NotFound(QueueError):
    pass


class WrongState(QueueError):
    pass


class QueueFull(QueueError):
    pass


class InvalidParameter(QueueError):
    pass


_BY_SQLSTATE: dict[str, type[QueueError]] = {
    "AI404": UnknownModel,
    "AI409": WrongState,
    "AI429": QueueFull,
    "22023": InvalidParameter,  # invalid_parameter_value (our own RAISEs)
    "23514": InvalidParameter,  # check_violation: a column rule, named by its constraint
    "22P02": InvalidParameter,  # invalid_text_representation: a JSON field of the wrong type
    "22003": InvalidParameter,  # numeric_value_out_of_range
}


def translate(error: psycopg.Error) -> Exception:
    """The QueueError for a database error we raise on purpose, else the error itself."""
    sqlstate = getattr(error, "sqlstate", None)
    cls = _BY_SQLSTATE.get(sqlstate or "")
    if cls is None:
        return error
    message = error.diag.message_primary or str(error)
    if sqlstate == "AI404" and "request" in message.split(":", 1)[0]:
        cls = NotFound
    if sqlstate == "23514" and error.diag.constraint_name:
        message = f"{message} (rule: {error.diag.constraint_name})"
    return cls(message)
