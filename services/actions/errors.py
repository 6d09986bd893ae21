"""Errors the actions service raises to its HTTP edge (routes map them to status codes)."""

from __future__ import annotations


class NotFound(Exception):
    """The thing does not exist for this tenant (another tenant's id included)."""


class Conflict(Exception):
    """The request is valid but the thing is in a state that does not allow it."""
