"""Which requests are inference: traced (`app.tracing`) and held back under load (`app.http.backpressure`)."""


def is_inference_path(path: str) -> bool:
    """`/predict`, `/explain` and v2 `infer` (never probes, `/metrics` or files)."""
    return path in ("/predict", "/explain") or (path.startswith("/v2/models/") and path.endswith("/infer"))
