"""Errors a command raises when the caller asked for something wrong. The API maps them to
4xx answers (docs/ARCHITECTURE.md, "Error rules"); the message names what was wrong, ``detail`` is JSON-able."""

from __future__ import annotations

from typing import Any


class CommandError(Exception):
    status = 400

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail


class Invalid(CommandError):
    status = 400


class Forbidden(CommandError):
    """The caller's principal may not do this to this object (its role allowed the route)."""

    status = 403


class NotFound(CommandError):
    status = 404


class Conflict(CommandError):
    status = 409


class TooLarge(CommandError):
    status = 413
