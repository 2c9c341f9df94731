"""Protocol adapters: the wire formats the service speaks, each in its own module or package.

Every inference request takes the same seam, whatever its protocol:

    adapter: its wire request -> one `app.dataplane.Call` (key, client timeout, model, version)
             and a parser (wire format and limits -> model input, checked before any queue)
      -> `DataPlane.run`: authorize, route to a version (rollout), parse, deadline, admit,
         infer in that version's micro-batcher, count, hold a refusal (`app.dataplane`)
      -> `Answer`: the version that answered and its probabilities (`app.served_model.Scored`)
      -> adapter (encode; every refusal is an `app.errors.ServeError`, rendered by the
         protocol's one `render_error`)

`predict` is the service's own API (POST /predict, and `{"detail": ...}` errors for every
FastAPI route outside v2), `explain` adds saliency to it, `v2` is the Open Inference Protocol.

To add a protocol over HTTP: a module here with a handler `(plane, scope, receive) -> Reply`
for its hot path and a `render_error(ServeError) -> Reply`; wrap the handler in
`app.http.routing.Endpoint` and give its FastAPI routes `protocol_route(render_error)`;
register both in `app.main.create_app`. A protocol over another transport (gRPC) makes the
same `DataPlane.run` call and maps `ServeError.status` to its own codes in one place.
"""
