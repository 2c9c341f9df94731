"""What the repository API shows: the index's rows (Triton's), and a rollout's figures per version."""

from __future__ import annotations

from typing import Any

from app.repository.layout import ModelOnDisk
from app.repository.registry import READY, UNAVAILABLE, Registry, version_order

Totals = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def index_rows(
    on_disk: dict[str, ModelOnDisk], registry: Registry, failures: dict[str, dict[str, str]], ready_only: bool
) -> list[dict[str, object]]:
    """Every version on disk (UNAVAILABLE: unloaded, or why it cannot be used) and every version
    served (its own state), with the last failed load's reason, in name and version order."""
    rows: dict[tuple[str, str], dict[str, object]] = {}
    for model in on_disk.values():
        for number in sorted({*model.versions, *model.problems}):
            reason = model.problems.get(number, "unloaded")
            rows[(model.name, str(number))] = {
                "name": model.name,
                "version": str(number),
                "state": UNAVAILABLE,
                "reason": reason,
            }
    for entry in registry:
        rows[(entry.model, entry.version)] = entry.row()
    for name, versions in failures.items():
        for failed, reason in versions.items():
            row = rows.setdefault((name, failed), {"name": name, "version": failed, "state": UNAVAILABLE})
            if row["state"] != READY:
                row["reason"] = reason
            else:
                row["reason"] = f"serving the earlier copy; the last load failed: {reason}"
    ordered = sorted(rows.values(), key=lambda r: (str(r["name"]), version_order(str(r["version"]))))
    return [r for r in ordered if not ready_only or r["state"] == READY]


def rollout_figures(totals: Totals, model: str) -> dict[str, Any]:
    """Per version and role of `model`, from the rollout counters: requests, images, the OOD-flagged
    share, the mean calibrated confidence and latency; for a shadow, its top-1 agreement with the
    default version on the same inputs and the mean absolute difference of their probabilities."""
    sums: dict[tuple[str, str], dict[str, float]] = {}
    for (name, labels), value in totals.items():
        tags = dict(labels)
        if tags.get("model") != model:
            continue
        metric = name.removeprefix("fashion_serve_rollout_").removesuffix("_total")
        sums.setdefault((tags["version"], tags.get("role", "shadow")), {})[metric] = value
    figures: dict[str, Any] = {}
    for (version, role), values in sorted(sums.items()):
        if role == "shadow" and "requests" not in values and "dropped" not in values:
            continue
        images, requests = values.get("images", 0.0), values.get("requests", 0.0)
        row: dict[str, Any] = {
            "requests": int(requests),
            "images": int(images),
            "ood_flagged_share": values.get("flagged", 0.0) / images if images else None,
            "mean_confidence": values.get("confidence", 0.0) / images if images else None,
            "mean_latency_ms": 1000 * values.get("seconds", 0.0) / requests if requests else None,
        }
        if role == "shadow":
            shared = sums.get((version, "shadow"), {})
            row["agreement"] = shared.get("agreed", 0.0) / images if images else None
            row["agreement_images"] = int(images)
            row["mean_abs_diff"] = shared.get("abs_diff", 0.0) / images if images else None
            row["dropped"] = int(shared.get("dropped", 0))
        figures.setdefault(version, {})[role] = row
    return figures
