"""Simulated annotators: a pool of people who check the served label against the item's real label.

The ground truth is the human label in the data set (Fine Food: the review's own star rating, mapped
to great / other). Each simulated annotator makes mistakes at their own rate, drawn around the pool's
mean `error_rate`; a mistake gives a wrong label (uniformly among the others). A share of the items is
reviewed by two annotators (`double_review`): when they disagree, both answers go to the log (the later
one wins in the trainer's replay buffer, as in a real tool where the last reviewer's answer stands).
Every review is one human interaction and counts against the budget.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Review:
    annotator_id: str
    label: str
    """The label this annotator says is right."""
    kind: str
    """"accept" (the served label is what they would give) or "correction"."""


class AnnotatorPool:
    def __init__(
        self,
        labels: list[str],
        *,
        size: int = 5,
        error_rate: float = 0.05,
        double_review: float = 0.1,
        seed: int = 0,
    ) -> None:
        self.labels = list(labels)
        self.rng = random.Random(seed)
        self.error_rate = error_rate
        self.double_review = double_review
        # Individual error rates spread around the mean (some people are more careful than others).
        self.rates = {
            f"annotator-{i}": min(0.5, max(0.0, self.rng.gauss(error_rate, error_rate / 2))) for i in range(size)
        }
        self.reviews = 0
        self.errors = 0
        self.double_reviewed = 0
        self.disagreements = 0

    def _answer(self, who: str, gold: str) -> str:
        if len(self.labels) > 1 and self.rng.random() < self.rates[who]:
            self.errors += 1
            return self.rng.choice([x for x in self.labels if x != gold])
        return gold

    def review(self, gold: str, served: str, max_reviews: int = 2) -> list[Review]:
        """One or two reviews (at most `max_reviews`) of an item whose true label is `gold` and whose
        served label is `served`."""
        n = 2 if self.rng.random() < self.double_review and max_reviews >= 2 else 1
        who = self.rng.sample(sorted(self.rates), n)
        answers = [self._answer(w, gold) for w in who]
        self.reviews += n
        if n == 2:
            self.double_reviewed += 1
            self.disagreements += answers[0] != answers[1]
        return [Review(w, a, "accept" if a == served else "correction") for w, a in zip(who, answers, strict=True)]

    def noisy_label(self, gold: str) -> str:
        """One annotator's label for an item (the passive baseline buys its labels from the same pool)."""
        who = self.rng.choice(sorted(self.rates))
        self.reviews += 1
        return self._answer(who, gold)

    @property
    def observed_error_rate(self) -> float:
        return self.errors / max(self.reviews, 1)

    @property
    def disagreement_rate(self) -> float:
        return self.disagreements / max(self.double_reviewed, 1)
