"""Which requests are inference: traced (`app.tracing`) and held back under load (`app.http.backpressure`)."""


def is_inference_path(path: str) -> bool:
    """`/predict`, `/explain`, their `/models/{name}[/versions/{v}]/` forms, and v2 `infer` (never
    probes, `/metrics`, the repository API or files)."""
    if path in ("/predict", "/explain"):
        return True
    if path.startswith("/models/"):
        return path.endswith(("/predict", "/explain"))
    return path.startswith("/v2/models/") and path.endswith("/infer")
