"""The cyclic garbage collector in a long-running service.

After imports and the first model load a policy service tracks about 390,000 objects (modules, functions,
classes, the models' Python objects), and a full collection walks all of them: 190 ms on a 2-core AMD EPYC,
holding the GIL. Request handling allocates enough (a SubmitChunks chunk makes thousands of objects) that
the collector starts one now and then under load, and each stalls every thread of the service: about half of
the 1 s, 50,000-event SubmitChunks runs measured took 0.2 s more CPU, and one traced batch by batch had a
185 ms gap. Almost none of those objects will ever be garbage, so the service freezes them once it serves
(`freeze_startup_objects`, CPython's `gc.freeze`): collections then walk only what was made since.

A frozen object is still freed by reference counting; what a freeze gives up is collecting frozen objects
that later become garbage in a reference cycle. Such garbage is bounded: what was alive at startup and is
later dropped (the first model version, a first feedback writer's state), once. The first version is the
large one, so the model slot, when a retired copy does not go away by itself, runs `collect_all`, which
also walks frozen objects. The freeze runs right after the service reports SERVING, in the same coroutine
step, before the event loop handles a request; a load the store watch has under way then is frozen too.
"""

from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect what is garbage now, then leave every surviving object out of later collections. Returns
    how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def collect_all() -> None:
    """A full collection that also walks frozen objects (a cycle frozen at startup, such as one holding
    the first model version). If anything was frozen, everything alive afterwards is frozen again: the
    serving version and what is in flight then, with the same bounded cost as the first freeze."""
    frozen = gc.get_freeze_count() > 0
    if frozen:
        gc.unfreeze()
    gc.collect()
    if frozen:
        gc.freeze()
