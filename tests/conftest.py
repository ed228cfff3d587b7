"""Fixtures shared by the whole suite."""

from __future__ import annotations

import logging

import pytest


@pytest.fixture
def hyperface_log():
    """The log records of hyperface's loggers during the test (they do not propagate to the root
    logger, so pytest's caplog does not see them)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger("hyperface")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
