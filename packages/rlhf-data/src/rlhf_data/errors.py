"""The data layer's error type (its own module so that the readers and the adapters share it)."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data or a bad data spec; the message names the file, the row and the field."""
