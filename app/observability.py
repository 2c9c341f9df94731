"""The Prometheus metrics (the logs are `app.logs`)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.rollout_metrics import RolloutMetrics

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# The OOD score (a squared Mahalanobis distance, models/trust.py): finer where the bundled
# checkpoints' thresholds lie (`ServedModel.ood_threshold`), coarser far below (garments) and far
# above (non-garments).
OOD_SCORE_BUCKETS = (25, 50, 75, 100, 150, 200, 225, 250, 275, 300, 325, 350, 375, 400, 450, 500, 600, 800, 1000, 2500)


def observe_many(histogram: Histogram, values: np.ndarray) -> None:
    """`histogram.observe(v)` for every value, with one increment per bucket hit rather than per
    value. It writes prometheus_client's per-bucket counts (`_buckets`, not cumulative) and `_sum`
    directly: `tests/app/test_metrics.py` checks it against `observe` for each library update."""
    values = values[~np.isnan(values)]  # `observe` would put a NaN in no bucket and spoil the sum
    if not len(values):
        return
    bounds = np.asarray(histogram._upper_bounds)
    hits = np.bincount(np.searchsorted(bounds, values, side="left"), minlength=len(bounds))
    histogram._sum.inc(float(values.sum(dtype=np.float64)))
    for index in np.flatnonzero(hits):
        histogram._buckets[index].inc(int(hits[index]))


class Metrics:
    """The service's metrics, on a registry of its own (several apps can live in one process).

    Under several worker processes, set PROMETHEUS_MULTIPROC_DIR (`python -m app` does) and
    /metrics aggregates every worker.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict[tuple[str, str, int | str], tuple[Any, Any]] = {}
        self._predicted_children: dict[tuple[str, str, str], Any] = {}
        self._ood_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self.requests = Counter(
            "fashion_serve_requests",
            "Requests by route (HTTP path template, or gRPC method), method (HTTP method, or GRPC) "
            "and status (HTTP status, or gRPC status code)",
            ("route", "method", "status"),
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "fashion_serve_request_seconds",
            "Request latency by route (HTTP path template, or gRPC method)",
            ("route",),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_latency = Histogram(
            "fashion_serve_inference_seconds",
            "Latency of one forward pass (one batch)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fashion_serve_batch_images",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=self.registry,
        )
        self.images_per_request = Histogram(
            "fashion_serve_request_images",
            "Images per inference request (/predict or v2)",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.dropped = Counter(
            "fashion_serve_dropped_requests",
            "Requests dropped before the forward pass, by reason (deadline passed, caller gone)",
            ("reason",),
            registry=self.registry,
        )
        self.refused = Counter(
            "fashion_serve_refused_requests",
            "Inference requests refused 503 at admission, by reason (queue_delay, concurrency)",
            ("reason",),
            registry=self.registry,
        )
        self._declare_drift()
        self.rollout = RolloutMetrics(self.registry)
        self._live: list[Collector] = []

    def _declare_drift(self) -> None:
        """The drift signals: what the model answers, and how far from its training data."""
        self.predictions = Counter(
            "fashion_serve_predictions",
            "Images answered, by top-1 class and the model version that answered (a drift signal)",
            ("class", "model", "version"),
            registry=self.registry,
        )
        self.ood_score = Histogram(
            "fashion_serve_ood_score",
            "OOD score of each image answered (checkpoints with OOD statistics only)",
            ("model", "version"),
            buckets=OOD_SCORE_BUCKETS,
            registry=self.registry,
        )
        self.ood_flagged = Counter(
            "fashion_serve_ood_flagged",
            "Images answered whose OOD score is past the checkpoint's threshold",
            ("model", "version"),
            registry=self.registry,
        )

    def totals(self, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample whose name starts with `prefix`, summed over this server's workers."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            families = registry.collect()
        else:
            families = self.registry.collect()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families
            for sample in family.samples
            if sample.name.startswith(prefix)
        }

    def add_live(self, collector: Collector) -> None:
        """A collector of this process's current state (the model it serves), asked at each
        scrape; under several workers it is reported beside the workers' summed counters."""
        self.registry.register(collector)
        self._live.append(collector)

    def count_request(self, route: str, method: str, status: int | str, seconds: float) -> None:
        """One finished request; the labelled children are looked up once per label set."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.requests.labels(route, method, str(status)),
                self.request_latency.labels(route),
            )
        children[0].inc()
        children[1].observe(seconds)

    def count_answers(
        self,
        model: tuple[str, str],
        class_names: Sequence[str],
        probabilities: np.ndarray,
        ood_scores: np.ndarray | None,
        flagged: np.ndarray | None,
    ) -> None:
        """The drift signals of one request's answered images: each one's top-1 class, its OOD
        score and whether it was flagged, labelled by the `model` (name, version) that answered.
        One increment per class and bucket hit, not per image; a single image (the common
        request) takes the plain calls, cheaper than numpy's."""
        if len(probabilities) == 1:
            self._predicted(class_names[int(probabilities[0].argmax())], model).inc()
            if ood_scores is not None and flagged is not None:
                score, flags = self._ood(model)
                score.observe(float(ood_scores[0]))
                if flagged[0]:
                    flags.inc()
            return
        if not len(probabilities):
            return
        counts = np.bincount(probabilities.argmax(axis=1), minlength=len(class_names))
        for index in np.flatnonzero(counts):
            self._predicted(class_names[int(index)], model).inc(int(counts[index]))
        if ood_scores is None or flagged is None:
            return
        score, flags = self._ood(model)
        observe_many(score, ood_scores)
        count = int(np.count_nonzero(flagged))
        if count:
            flags.inc(count)

    def _predicted(self, class_name: str, model: tuple[str, str]) -> Any:
        key = (class_name, *model)
        child = self._predicted_children.get(key)
        if child is None:
            child = self._predicted_children[key] = self.predictions.labels(*key)
        return child

    def _ood(self, model: tuple[str, str]) -> tuple[Any, Any]:
        children = self._ood_children.get(model)
        if children is None:
            children = self._ood_children[model] = (self.ood_score.labels(*model), self.ood_flagged.labels(*model))
        return children

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            for collector in self._live:
                registry.register(collector)
            return generate_latest(registry)
        return generate_latest(self.registry)


class ModelCollector(Collector):
    """`fashion_serve_model_info` (the model this worker serves now: one series, value 1), its OOD
    baseline (`fashion_serve_ood_threshold`, `fashion_serve_ood_expected_flagged_ratio`: the share
    of validation garments the checkpoint's threshold flags) when it has one,
    `fashion_serve_model_reloads_total{result}` (the supervisor's counts) and the last reload's
    outcome (`fashion_serve_model_last_reload_success`, `..._timestamp_seconds`), read at each scrape."""

    def __init__(
        self,
        served: Callable[[], tuple[str, ...] | None],
        reloads: Callable[[], dict[str, int]],
        last_reload: Callable[[], dict[str, Any] | None],
        ood_baseline: Callable[[], tuple[float, float | None] | None] = lambda: None,
    ) -> None:
        self.served = served  # (name, arch, sha256, device) of the model now served, or None
        self.reloads = reloads
        self.last_reload = last_reload
        self.ood_baseline = ood_baseline  # (threshold, expected flagged ratio or None), or None

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "fashion_serve_model_info", "The model being served (value 1)", labels=("name", "arch", "sha256", "device")
        )
        served = self.served()
        if served is not None:
            info.add_metric(list(served), 1)
        yield info
        yield from self._ood_baseline()
        reloads = CounterMetricFamily(
            "fashion_serve_model_reloads", "Model reloads asked for with SIGHUP, by result", labels=("result",)
        )
        for result, count in self.reloads().items():
            reloads.add_metric([result], count)
        yield reloads
        last = self.last_reload()
        if last is not None:
            yield GaugeMetricFamily(
                "fashion_serve_model_last_reload_success",
                "1 if the last SIGHUP reload was installed, 0 if it was refused",
                value=1 if last.get("result") == "success" else 0,
            )
            yield GaugeMetricFamily(
                "fashion_serve_model_last_reload_timestamp_seconds",
                "When the last SIGHUP reload ended (Unix time)",
                value=float(last.get("finished_at") or 0),
            )
            if isinstance(last.get("validation_s"), int | float):
                yield GaugeMetricFamily(
                    "fashion_serve_model_last_reload_validation_seconds",
                    "How long the last SIGHUP reload's validation took",
                    value=float(last["validation_s"]),
                )

    def _ood_baseline(self) -> Iterator[Metric]:
        baseline = self.ood_baseline()
        if baseline is None:
            return
        threshold, expected = baseline
        yield GaugeMetricFamily("fashion_serve_ood_threshold", "The served checkpoint's OOD threshold", value=threshold)
        if expected is not None:
            yield GaugeMetricFamily(
                "fashion_serve_ood_expected_flagged_ratio",
                "Share of validation garments the checkpoint's OOD threshold flags (the drift baseline)",
                value=expected,
            )
