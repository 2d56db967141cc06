"""Errors a user can act on. The CLI prints their message and exits non-zero."""

from __future__ import annotations


class MMGuardError(Exception):
    """A problem with the user's input or options, explained in the message."""


class BadItemError(MMGuardError):
    """One data item (image or its text) cannot be used.

    `item` names the item the way the user can find it (manifest row and image
    path, or a built-in dataset key); `reason` says what is wrong with it.
    """

    def __init__(self, item: str, reason: str):
        super().__init__(f"{item}: {reason}")
        self.item = item
        self.reason = reason
