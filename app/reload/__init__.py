"""Reloading the model on purpose (SIGHUP), in two halves that meet at one file.

- `supervisor`: the supervisor process (`python -m app`) copies the configured checkpoint's
  bytes into a private snapshot once they are validated; SIGHUP reads the file again and
  validates it in a process forked from the supervisor (`validate`: everything start-up checks,
  plus a warm-up forward pass) before it replaces the snapshot.
- `worker`: each worker serves the snapshot, never the configured path, and swaps in a new
  one between batches, so a worker that replaces a dead one serves the same model as the others.
- `snapshot`: what the two halves share (where the snapshot is, the reload counts).

A reload that fails changes nothing but a log line and `fashion_serve_model_reloads_total{result="failure"}`.
"""
