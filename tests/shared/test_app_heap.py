"""settled_heap: a serving process's collector settings for its lifetime, undone after."""

from __future__ import annotations

import gc

from shared.app import settled_heap


def test_the_heap_is_frozen_and_young_collections_rarer_only_inside() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with settled_heap(young_threshold=12_345):
        assert gc.get_freeze_count() > 0  # what was built so far is out of the collector's sight
        assert gc.get_threshold() == (12_345, *before[1:])
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0  # collectable again once the app is gone
