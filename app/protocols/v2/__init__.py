"""The Open Inference Protocol v2 (KServe's V2, Triton's HTTP/REST): what tensor clients speak.

- `request`: a JSON or binary-tensor body -> what it asks for and its model input (images in
  the BYTES form are decoded exactly as /predict decodes them);
- `infer`: the plain-ASGI inference endpoint (parse, admit, infer, encode);
- `response`: outputs as tensors or with the classification extension, and `render_error`,
  the one place a refusal becomes `{"error": message}`;
- `metadata`: server and model metadata, health and configuration (FastAPI routes);
- `openapi`: the inference operations in /openapi.json.
"""
