"""A real component a test needs is missing: skip on a developer's machine, fail under CI.

House rule: under ``CI=true`` a missing Mosquitto, PostgreSQL, Chromium or helm fails the run
(the test command installs them); it never turns into a skip. Fixtures call ``missing``.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(what: str) -> NoReturn:
    """Skip (``pytest.skip``) with ``what``, or fail the test when running under CI."""
    if in_ci():
        pytest.fail(f"{what} (CI=true: a missing component fails the run)", pytrace=False)
    pytest.skip(what)
