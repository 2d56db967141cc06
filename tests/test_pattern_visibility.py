"""benchmarks/pattern_visibility.py: can a frozen tower's features tell a pattern's group?"""

from __future__ import annotations

import pytest

from benchmarks.pattern_visibility import parse_pattern, visibility
from mmguard.errors import MMGuardError


def test_a_strong_pattern_is_read_and_no_pattern_stays_at_chance():
    rows = visibility("fashion-mnist", ["lvlm-test"], ["luma-coarse4-sign"], ["none"],
                      train=60, held_out=60, groups=2, eps=96 / 255, seed=0)
    accuracy = {row["pattern"]: row["accuracy"] for row in rows}
    # groups are drawn independently of the images: without a pattern nothing tells them
    assert abs(accuracy["none (clean)"] - 0.5) < 0.2
    # a +-96/255 pattern per group is linearly readable even through a random tiny tower
    assert accuracy["luma-coarse4-sign"] > 0.75
    assert accuracy["luma-coarse4-sign"] > accuracy["none (clean)"] + 0.15
    assert all(row["chance"] == 0.5 and row["train"] == 60 for row in rows)


def test_pattern_names_parse_to_class_pattern_settings_and_bad_ones_are_named():
    assert parse_pattern("luma-cells32-square") == {"gray": True, "values": "square",
                                                    "cells": 32, "coarse": 1}
    assert parse_pattern("colour-coarse4-sign") == {"gray": False, "values": "sign",
                                                    "cells": 0, "coarse": 4}
    with pytest.raises(MMGuardError, match="'luma-cells8-gauss'"):
        parse_pattern("luma-cells8-gauss")
    with pytest.raises(MMGuardError, match="at least 1"):
        parse_pattern("luma-cells0-sign")
