"""settled_heap: a serving process's collector settings for its lifetime, undone after; freeze_heap,
which it and scoring's model loads use."""

from __future__ import annotations

import gc

import weakref

from shared.app import freeze_heap, settled_heap


def test_the_heap_is_frozen_and_young_collections_rarer_only_inside() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with settled_heap(young_threshold=12_345, full_threshold=77):
        assert gc.get_freeze_count() > 0  # what was built so far is out of the collector's sight
        assert gc.get_threshold() == (12_345, before[1], 77)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0  # collectable again once the app is gone


def test_keeping_the_thresholds_only_freezes() -> None:
    before = gc.get_threshold()
    with settled_heap(young_threshold=None, full_threshold=None):
        assert gc.get_freeze_count() > 0 and gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


class _Node:
    pass


def test_freezing_collects_cyclic_garbage_first_and_freezes_what_is_alive() -> None:
    cycle = _Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    gone = weakref.ref(cycle)
    del cycle
    alive = [_Node() for _ in range(1000)]  # tracked by the collector (dicts of ints are not)
    try:
        freeze_heap()
        assert gone() is None  # collected, not frozen with the rest
        assert gc.get_freeze_count() >= len(alive)
    finally:
        gc.unfreeze()
