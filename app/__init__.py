"""fashion-serve: a Fashion-MNIST classifier served over HTTP.

The map, from the core outwards:
- core (no wire format): `dataplane` (readiness, model lookup, API keys, admission, `infer`),
  `served_model` (a loaded model and its micro-batcher, `batching`), `decoding` (image bytes ->
  model input), `errors` (`ServeError`), `settings`, `observability` (logs and metrics);
- `protocols/`: `predict`, `explain`, `v2/`: each parses, calls the data plane, encodes, and
  renders its errors in one place;
- `http/`: the HTTP transport (ASGI messages, multipart, head limits, request context, routing);
- `routes/`: probes, /metrics, /model, /docs and the page;
- processes: `__main__` and `server` (the gunicorn supervisor), `worker` (one worker process: its parts and its life),
  `reload/` (SIGHUP: supervisor and worker halves);
- `main`: `create_app` composes all of it.
"""

__version__ = "0.1.0"
