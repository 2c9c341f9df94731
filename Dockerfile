# fashion-serve: the FastAPI classifier and its bundled checkpoint, CPU PyTorch by default.
#
#   docker build -t fashion-serve .                      # serving image (target `runtime`)
#   docker build --target train -t fashion-serve:train .  # training image (compose `train` profile)
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t fashion-serve:cuda .
#
# Build args (the torch wheel source; nothing else is configured at build time):
#   TORCH_INDEX_URL          index that torch (and, for `train`, torchvision) come from.
#                            The default CPU index keeps the image small; a CUDA index (cu126, cu128, ...)
#                            gives the GPU variant, whose wheels carry their own CUDA libraries.
#   TORCH_REQUIREMENT        e.g. torch==2.13.0+cpu to pin; default: the newest on TORCH_INDEX_URL.
#   TORCHVISION_REQUIREMENT  the `train` target only; must pair with torch.
#   PIP_FIND_LINKS           local wheel folders (space-separated) mounted at build time; CI uses it
#                            to build offline from the same Dockerfile. Empty for ordinary builds.
# Runtime configuration is only FASHION_SERVE_* environment variables (see the README).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --create-home --home-dir /home/app --shell /usr/sbin/nologin app


FROM base AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_REQUIREMENT=torch
ARG PIP_FIND_LINKS=""
WORKDIR /src
# torch first and from its own index, so the project's `torch>=...` is already met by the CPU build.
# The venv pins torch 2.14.1 (constraints.txt), a CUDA build on PyPI; the image takes a CPU build
# instead (a tenth of the size), and the container check passes the newest CPU wheel it has
# offline (2.13.0+cpu on the CI machine): the same API, a different patch level of kernels.
# hadolint ignore=DL3013
RUN python -m venv /opt/venv \
    && pip install --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT"
# Serving dependencies straight from pyproject.toml (no extras: no torchvision), in their own layer
# so that editing the code does not reinstall them.
# The server stack at constraints.txt's pins (its torch lines aside: torch came from its own index above).
COPY pyproject.toml constraints.txt ./
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
        > /tmp/requirements.txt \
    && grep -v '^torch' constraints.txt > /tmp/constraints.txt \
    && pip install -c /tmp/constraints.txt -r /tmp/requirements.txt
COPY README.md ./
COPY app ./app
COPY models ./models
COPY training ./training
RUN test -f models/fashion_cnn.pt \
        || { echo "models/fashion_cnn.pt is missing: train it first (python -m training train --out models/fashion_cnn.pt)" >&2; exit 1; } \
    && pip install --no-deps . \
    && python -c 'import models, pathlib; assert (pathlib.Path(models.__file__).parent / "fashion_cnn.pt").is_file()'
# torch's C++ test binaries and headers: no use when serving (and the slim image has no compiler). ~190 MB.
RUN site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && rm -rf "$site/torch/test" "$site/torch/include" "$site"/torch/bin/test_* "$site"/torch/bin/*Test \
    && python -c 'import torch; torch.ones(1) + 1'


# Training: the serving environment plus the `train` extra (torchvision from the same index as torch).
FROM build AS train
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_REQUIREMENT=torch
ARG TORCHVISION_REQUIREMENT=torchvision
ARG PIP_FIND_LINKS=""
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX_URL" "$TORCH_REQUIREMENT" "$TORCHVISION_REQUIREMENT" \
    && python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["train"]))' \
        > /tmp/requirements-train.txt \
    && pip install -r /tmp/requirements-train.txt \
    && python -c 'import torchvision, matplotlib, tqdm'
RUN mkdir -p /checkpoints /data && chown app:app /checkpoints /data
ENV MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /home/app
USER 10001:10001
ENTRYPOINT ["python", "-m", "training"]
# The bundled checkpoint's recipe (README), written into the /checkpoints volume.
CMD ["train", "--arch", "cnn", "--epochs", "15", "--augment", "flip", "--seed", "0", \
     "--out", "/checkpoints/fashion_cnn.pt", "--data-dir", "/data", "--download"]


# The serving image; the last stage, so a plain `docker build` builds it.
FROM base AS runtime
COPY --from=build /opt/venv /opt/venv
ENV FASHION_SERVE_HOST=0.0.0.0 \
    FASHION_SERVE_PORT=8000 \
    FASHION_SERVE_GRPC_PORT=8081
WORKDIR /home/app
USER 10001:10001
# HTTP (REST, v2 REST) and gRPC (v2 over gRPC, grpc.health.v1).
EXPOSE 8000 8081
# Ready means the model is loaded and warmed up. Python, not curl (slim images have none); no proxy for localhost.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%s/health/ready' % os.environ.get('FASHION_SERVE_PORT', '8000'), timeout=4)"]
# uvicorn turns SIGTERM into a graceful shutdown (FASHION_SERVE_SHUTDOWN_GRACE_S, default 8 s).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
