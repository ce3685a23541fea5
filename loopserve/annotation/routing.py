"""Which items of a streamed chunk a person should label: coverage first, then uncertainty within coverage.

An app that streams items through Annotate can afford `quota` human interactions for a chunk (its
budget spread over the stream). Which items it spends them on decides how much the next version learns:

- While the serving version is unchecked (the zero-shot base, or anything not past the trainer's gate),
  its confidence means nothing, so the chunk is covered: k-means over the chunk's texts into `quota`
  clusters, and the item nearest each centre goes to a person (representative, diverse labels first;
  the cold-start lesson of small-data active learning: uncertainty sampling from a bad model spends the
  first labels on hard, unrepresentative items).
- Once a checked version serves, only the items it flagged `needs_review` are candidates; they are
  clustered the same way and each cluster gives up its least certain item (smallest margin between the
  two best labels): uncertainty, but never thirty near-duplicates of one confusing product.
- Top-up: a checked version that flags fewer items than the quota leaves part of it unspent. `never` (the
  apps' default): the share carries over to later flagged items (the apps' pace line), which is what a
  stream that goes on wants. `always`: the least certain of its confident items (clustered alike) take it
  at once; spent that early, the share went to items a version trained on a dozen labels was sure of, and
  the quick demo read worse. `stream-end`: a stream that ends (the demo's, the bench's) tops up only what
  the rest of it cannot absorb at the chunk's flag rate, spread over the chunks left, so the budget is
  spent by the end (on Fine Food the loop without top-up stopped asking at 843-915 of 1,000 labels).

`route_chunk` is the app's whole decision for one streamed chunk (the audit, then these picks among the chunk
and the flagged items still waiting); the demo's app and bench/learning.py both call it.

Texts are featurised with a hashing TF-IDF (stateless, so chunks need no shared vocabulary, and no
model call: the app only has the Annotate answer and the texts). Pure numpy/scikit-learn; no service,
no trainer import: the demo's app and bench/learning.py route with this same function.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

from loopserve.annotation.top_up import TopUp, top_up_share

_VECTORIZER = HashingVectorizer(n_features=2**18, ngram_range=(1, 2), alternate_sign=False, norm=None)


def text_features(texts: Sequence[str]) -> np.ndarray:
    """(n, 2**18) sparse TF-IDF rows, L2-normalised (IDF over the chunk itself)."""
    counts = _VECTORIZER.transform(list(texts))
    return TfidfTransformer(sublinear_tf=True).fit_transform(counts)  # type: ignore[no-any-return]


def margins(probs: np.ndarray) -> np.ndarray:
    """(n, L) probabilities -> (n,) top-1 minus top-2 (1.0 with a single label)."""
    if probs.shape[1] < 2:
        return np.ones(probs.shape[0])
    top2 = np.sort(probs, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]  # type: ignore[no-any-return]


def pick_for_review(
    texts: Sequence[str],
    probs: np.ndarray,
    needs_review: Sequence[bool],
    quota: int,
    *,
    checked: bool,
    rng: random.Random,
    top_up: int = 0,
    taken: Collection[int] = (),
) -> list[int]:
    """Indices (into the chunk) of at most `quota` items for people, in the order to show them.

    `probs` (n, L): the served label distribution per item; `checked`: whether the serving version passed
    the gate (otherwise confidence is ignored and the chunk is covered); `top_up`: at most this many of a
    checked version's confident items fill the quota its flagged items leave; `taken`: items already going
    to a person (the app's random audit), never picked again, so the quota is spent on other items."""
    n = len(texts)
    if quota <= 0:
        return []

    def features(candidates: list[int]) -> Any:
        return text_features([texts[i] for i in candidates])

    free = [i for i in range(n) if i not in taken]
    if not checked:
        return per_cluster(free, np.zeros(n), quota, rng, least_certain=False, features=features)
    m = margins(np.asarray(probs, dtype=float))
    flagged = [i for i in free if needs_review[i]]
    picks = per_cluster(flagged, m, quota, rng, least_certain=True, features=features)
    extra = min(top_up, quota - len(picks))
    if extra > 0:
        confident = [i for i in free if not needs_review[i]]
        picks += per_cluster(confident, m, extra, rng, least_certain=True, features=features)
    return picks


def per_cluster(
    candidates: list[int],
    m: np.ndarray,
    quota: int,
    rng: random.Random,
    *,
    least_certain: bool,
    features: Callable[[list[int]], Any],
) -> list[int]:
    """At most `quota` of `candidates`, least certain (smallest `m`) first: all of them if they fit, else one
    per k-means cluster of `features(candidates)` (a row per candidate: the router's hashed TF-IDF; a bench
    may pass embeddings), its least certain item, or with `least_certain` False its most typical one."""
    if not candidates:
        return []
    if len(candidates) <= quota:
        return sorted(candidates, key=lambda i: m[i])
    x = features(candidates)
    km = KMeans(n_clusters=quota, n_init=1, random_state=rng.randrange(2**31)).fit(x)
    dist = km.transform(x)  # (c, quota): distance of each candidate to each centre
    picks = []
    for k in range(quota):
        members = np.flatnonzero(km.labels_ == k)
        if members.size == 0:
            continue
        if least_certain:  # uncertainty within the cluster
            best = members[np.argmin(m[[candidates[j] for j in members]])]
        else:  # the cluster's most typical item
            best = members[np.argmin(dist[members, k])]
        picks.append(candidates[int(best)])
    return sorted(picks, key=lambda i: m[i])


def route_chunk(
    texts: Sequence[str],
    probs: np.ndarray,
    needs_review: Sequence[bool],
    waiting_texts: Sequence[str],
    waiting_probs: Sequence[np.ndarray],
    quota: int,
    *,
    checked: bool,
    audit_fraction: float,
    rng: random.Random,
    top_up: TopUp = "never",
    items_left: int | None = None,
    budget_after: int = 0,
) -> list[int]:
    """Which of a streamed chunk's items and the flagged items waiting in the backlog go to people, in
    order, as indices into chunk + waiting (the chunk's first): at most `quota` of them.

    First a random `audit_fraction` of the chunk's confident items (checked versions only: an unbiased
    measure of what is being auto-labelled), then `pick_for_review` over the chunk and the waiting items
    (flagged by definition) for the rest of the quota, never an audited item twice; what the flagged items
    leave goes to confident ones as `top_up` says (`items_left`: items the stream has after this chunk,
    None if it goes on; `budget_after`: the interactions its pace line allows them)."""
    n = len(texts)
    audits = [i for i in range(n) if checked and not needs_review[i] and rng.random() < audit_fraction]
    audits = audits[: max(quota, 0)]
    taken = set(audits)
    flagged = sum(1 for i in range(n) if needs_review[i] and i not in taken) + len(waiting_texts)
    left = max(0, quota - len(audits) - flagged)
    extra = top_up_share(top_up, left, n, sum(needs_review) / max(n, 1), items_left, budget_after)
    cand_probs = np.concatenate([probs, *([np.stack(list(waiting_probs))] if len(waiting_probs) else [])])
    routed = pick_for_review(
        [*texts, *waiting_texts],
        cand_probs,
        [*needs_review, *[True] * len(waiting_texts)],
        quota - len(audits),
        checked=checked,
        rng=rng,
        top_up=extra,
        taken=taken,
    )
    return audits + routed
