"""Protocol adapters: the wire formats the service speaks, each in one module.

Every request takes the same seam, whatever its protocol:

    adapter (parse the wire format, enforce its limits)
      -> decode to model input (`app.decoding.ModelInput`)
      -> `Runtime.infer`: the one micro-batcher, shared by all protocols (`app.service`)
      -> probabilities (`app.service.Scored`)
      -> adapter (encode; errors are `app.errors.ServeError`, rendered in the protocol's shape)

`predict` is the service's own API (POST /predict), `v2` the Open Inference Protocol. To add
a third protocol: write a module here with a plain ASGI endpoint for its hot path (copy the
shape of `predict.PredictEndpoint`) and, for anything else, a FastAPI router; register them
in `app.main.create_app` (the `fast_routes` list and `include_router`).
"""
