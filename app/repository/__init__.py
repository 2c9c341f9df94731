"""Many models, one truth: the models and versions a worker serves, the repository on disk they
come from, and the state every worker of one server agrees on.

- `registry`: what this worker serves now (name -> version -> served model, with its state).
- `layout`: the repository on disk, laid out as Triton lays it out (`DIR/<name>/<version>/`).
- `shared`: the desired state every worker follows, and each worker's acknowledgement of it.
- `control`: loads, unloads and reconciles in one worker, validated before anything serves.
"""
