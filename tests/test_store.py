"""The identity-safe state store: weak references, id reuse, no leaks."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

import composeopt as co
from composeopt.store import StateStore, copy_state


def test_state_is_found_by_identity_not_by_value():
    store = StateStore()
    a, b = np.zeros(3), np.zeros(3)
    store.set(a, "A")
    assert store.get(a) == "A" and store.get(b) is None
    assert a in store and b not in store


def test_entry_is_dropped_when_the_parameter_dies():
    store = StateStore()
    x = np.zeros(3)
    store.set(x, "state")
    del x
    gc.collect()
    assert len(store) == 0


def test_reused_id_of_a_dead_array_is_a_new_parameter():
    store = StateStore()
    # Simulate the race the weak reference guards against: an entry whose
    # object is gone while a new object sits at the same id.
    dead = np.zeros(3)
    alive = np.zeros(3)
    store.set(dead, "stale")
    stale_entry = store._entries.pop(id(dead))
    store._entries[id(alive)] = stale_entry
    assert store.get(alive) is None
    store.set(alive, "fresh")
    assert store.get(alive) == "fresh"


@pytest.mark.filterwarnings("ignore::composeopt.errors.StateResetWarning")  # rebuilt on purpose
def test_real_id_reuse_through_the_engine_starts_fresh_state():
    opt = co.Adam(0.1)
    seen_ids = {}
    for _ in range(50):
        x = np.ones(4)
        if id(x) in seen_ids:
            assert co.state_store(opt).get(x) is None  # never the old array's moments
        co.update_(opt, x, np.ones(4))
        assert co.state_store(opt).get(x).t == 1
        seen_ids[id(x)] = True
        del x
    assert len(seen_ids) < 50  # CPython did reuse ids, so the check above ran


@pytest.mark.filterwarnings("ignore::composeopt.errors.StateResetWarning")  # rebuilt on purpose
def test_no_growth_over_many_rebuilt_models():
    opt = co.Optimiser(co.WeightDecay(1e-4), co.Adam())
    for _ in range(300):
        model = {"W": np.ones((8, 8)), "b": np.zeros(8), "layers": [np.ones(3) for _ in range(3)]}
        grads = {"W": np.ones((8, 8)), "b": np.ones(8), "layers": [np.ones(3) for _ in range(3)]}
        co.update_(opt, model, grads)
        assert len(co.state_store(opt)) <= 5
    del model
    gc.collect()
    assert len(co.state_store(opt)) == 0


def test_the_store_does_not_keep_its_optimiser_alive():
    opt = co.Adam()
    x = np.ones(2)
    co.update_(opt, x, np.ones(2))
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    del x  # the weak reference's callback runs on a store that is gone: must not fail
    gc.collect()


def test_move_hands_state_to_the_new_array():
    store = StateStore()
    old, new = np.zeros(2), np.zeros(2)
    store.set(old, "s")
    store.move(old, new)
    assert store.get(new) == "s" and store.get(old) is None
    store.move(old, new)  # nothing to move: no change
    assert store.get(new) == "s"


def test_arrays_without_weak_references_are_held_strongly():
    class NoWeakref:
        __slots__ = ()

    store = StateStore()
    obj = NoWeakref()
    store.set(obj, 1)
    assert store.get(obj) == 1
    store.set(obj, 2)
    assert store.get(obj) == 2 and len(store) == 1


def test_copy_state_copies_arrays_and_recurses():
    mu = np.ones(2)
    state = (co.State(mu=mu, t=3), [np.zeros(1)], {"k": np.ones(1)}, None, {1, 2})
    copied = copy_state(state)
    mu[0] = 5.0
    assert copied[0].mu[0] == 1.0 and copied[0].t == 3
    assert copied[1][0] is not state[1][0] and copied[2]["k"] is not state[2]["k"]
    assert copied[4] == {1, 2} and copied[4] is not state[4]


def test_version_moves_with_every_change_to_what_the_store_holds():
    store = StateStore()
    x, y = np.zeros(3), np.zeros(3)
    seen = [store.version]

    def moved():
        seen.append(store.version)
        return seen[-1] != seen[-2]

    state = object()
    store.set(x, state)
    assert moved()  # added
    store.set(x, state)
    assert not moved()  # the same state again: nothing changed
    store.set(x, object())
    assert moved()  # replaced
    store.move(x, y)
    assert moved()
    store.discard(y)
    assert moved()
    store.set(x, state)
    assert moved()
    del x
    gc.collect()
    assert moved() and len(store) == 0  # the garbage collector dropped x's entry
    store.clear()
    assert moved()
    store.frozen.set(y, True)
    assert not moved() and store.frozen.version == 1  # frozen marks keep their own version


def test_state_changes_moves_with_every_field_set_or_deleted():
    from composeopt.rule import state_changes

    state = co.State(t=0)
    seen = {state_changes()}
    state.t += 1
    seen.add(state_changes())
    state.mu = np.zeros(2)
    seen.add(state_changes())
    del state.mu
    seen.add(state_changes())
    assert len(seen) == 4
    now = state_changes()
    assert state.t == 1  # reading is not a change
    assert state_changes() == now and vars(state) == {"t": 1}
