"""The Open Inference Protocol v2 over gRPC (`inference.GRPCInferenceService`), beside REST on
the same data plane, plus `grpc.health.v1.Health` for probes.

- `proto/`: the .proto and the Python generated from it (scripts/gen-grpc);
- `infer`: ModelInfer as a thin adapter over the v2 request checks and decoders and the output
  tensors of `app.protocols.v2` (the REST parser's functions, not a second parser);
- `status`: the one place a `ServeError` status becomes a gRPC status code;
- `servicer`: the RPCs (keys, request ids, metrics and logs per call) and the health service;
- `server`: one `grpc.aio` server per worker, started after the fork in the worker's lifespan.

Nothing outside this package imports grpc, and `app.worker` imports this package only inside
the worker: grpc is not fork-safe, and the supervisor forks the workers.
"""
