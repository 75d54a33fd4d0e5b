"""Hostile inputs to `pact-cache` (build, verify, inspect, stats, merge): see tests/hostile.py."""

from __future__ import annotations

import pytest

from hostile import Case, check_case

FAMILY = "pact-cache"

CASES = [
    Case("inspect-row-out-of-range", "`--row` past the last row", "pact-cache",
         lambda w: ["inspect", str(w.cache), "--row", "99"], 2, "row 99"),
    Case("verify-missing-dir", "a cache directory that does not exist", "pact-cache",
         lambda w: ["verify", str(w.path("nowhere"))], 2, "nowhere"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_cache_input(case, world, capsys):
    check_case(case, world, capsys)
