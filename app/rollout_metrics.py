"""The rollout's counters: how each version of a model under a rollout answers (role: default,
canary, shadow), and how far a shadow agrees with the default version on the same inputs. The
repository API's rollout figures (`app.repository.views.rollout_figures`) are read from them."""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        """How each version of a model under a rollout answers (role: default, canary, shadow), and
        how far a shadow agrees with the default version on the same inputs."""
        labels = ("model", "version", "role")
        self._labelled: dict[tuple[str, str, str], tuple[Any, ...]] = {}

        def counter(name: str, doc: str, names: tuple[str, ...] = labels) -> Counter:
            return Counter(name, doc, names, registry=registry)

        self.requests = counter(
            "fashion_serve_rollout_requests", "Requests answered by a version of a model under a rollout"
        )
        self.images = counter("fashion_serve_rollout_images", "Images answered by a version of a model under a rollout")
        self.flagged = counter(
            "fashion_serve_rollout_flagged", "Of those images, the ones past the version's OOD threshold"
        )
        self.confidence = counter(
            "fashion_serve_rollout_confidence", "Sum of those images' top-1 calibrated probabilities"
        )
        self.seconds = counter(
            "fashion_serve_rollout_seconds", "Sum of those requests' seconds (a shadow's: its own run)"
        )
        self.agreed = counter(
            "fashion_serve_rollout_agreed",
            "Shadow images whose top-1 class is the default version's",
            ("model", "version"),
        )
        self.abs_diff = counter(
            "fashion_serve_rollout_abs_diff",
            "Sum over shadow images of the mean absolute difference of probabilities",
            ("model", "version"),
        )
        self.dropped = counter(
            "fashion_serve_rollout_dropped",
            "Shadow runs dropped: the server was too busy to spare the work",
            ("model", "version"),
        )

    def count(self, model: tuple[str, str], role: str, scored: Any, seconds: float, requests: int = 1) -> None:
        """The answer (a `Scored`) of a version of a model under a rollout to `requests` requests, in
        its role; `seconds` is their sum."""
        answered, spent, images, confidence, flagged = self._children(model, role)
        rows = scored.probabilities
        answered.inc(requests)
        spent.inc(seconds)
        if len(rows):
            images.inc(len(rows))
            confidence.inc(float(rows.max(axis=1).sum()))
            if scored.flagged is not None:
                flagged.inc(int(np.count_nonzero(scored.flagged)))

    def _children(self, model: tuple[str, str], role: str) -> tuple[Any, ...]:
        """The labelled counters of one version and role, looked up once, not per request."""
        key = (*model, role)
        children = self._labelled.get(key)
        if children is None:
            counters = (self.requests, self.seconds, self.images, self.confidence, self.flagged)
            children = self._labelled[key] = tuple(counter.labels(*key) for counter in counters)
        return children

    def count_shadow(
        self, model: tuple[str, str], primary: np.ndarray, shadow: Any, seconds: float, requests: int
    ) -> None:
        """A shadow's answer (a `Scored`) to `requests` requests beside the default version's
        probabilities on the same images."""
        self.count(model, "shadow", shadow, seconds, requests)
        rows = shadow.probabilities
        agreed = int(np.count_nonzero(primary.argmax(axis=1) == rows.argmax(axis=1)))
        self.agreed.labels(*model).inc(agreed)
        self.abs_diff.labels(*model).inc(float(np.abs(primary - rows).mean(axis=1).sum()))
