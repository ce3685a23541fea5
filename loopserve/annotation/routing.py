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

Texts are featurised with a hashing TF-IDF (stateless, so chunks need no shared vocabulary, and no
model call: the app only has the Annotate answer and the texts). Pure numpy/scikit-learn; no service,
no trainer import: the demo's app and bench/learning.py route with this same function.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
from sklearn.cluster import KMeans
from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

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
) -> list[int]:
    """Indices (into the chunk) of at most `quota` items for people, in the order to show them.

    `probs` (n, L): the served label distribution per item; `checked`: whether the serving version passed
    the gate (otherwise confidence is ignored and the chunk is covered)."""
    n = len(texts)
    candidates = list(range(n)) if not checked else [i for i in range(n) if needs_review[i]]
    if quota <= 0 or not candidates:
        return []
    m = margins(np.asarray(probs, dtype=float)) if checked else np.zeros(n)
    if len(candidates) <= quota:
        return sorted(candidates, key=lambda i: m[i])
    x = text_features([texts[i] for i in candidates])
    km = KMeans(n_clusters=quota, n_init=1, random_state=rng.randrange(2**31)).fit(x)
    dist = km.transform(x)  # (c, quota): distance of each candidate to each centre
    picks = []
    for k in range(quota):
        members = np.flatnonzero(km.labels_ == k)
        if members.size == 0:
            continue
        if checked:  # uncertainty within the cluster
            best = members[np.argmin(m[[candidates[j] for j in members]])]
        else:  # the cluster's most typical item
            best = members[np.argmin(dist[members, k])]
        picks.append(candidates[int(best)])
    return sorted(picks, key=lambda i: m[i])
