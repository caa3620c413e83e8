# syntax=docker/dockerfile:1
# One image for every sam-data-engine process in docker-compose.yml: the Prefect worker
# (`data-engine serve`), the Label Studio ML backend (`data-engine ml-backend`), batch stage-3 runs
# (`data-engine amg`) and the Dask scheduler/workers they fan out to.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, from the PyTorch CPU index: the default index's Linux wheel pulls several GiB of
# CUDA libraries this image never uses. Its own layer, so code changes do not reinstall it.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/sam-data-engine
COPY pyproject.toml README.md ./
COPY storage ./storage
COPY engine ./engine
COPY annotation_ui ./annotation_ui
COPY flows ./flows
# `torch==2.13.0` in pyproject is satisfied by the `2.13.0+cpu` build installed above, so pip keeps
# it; the dask extra brings prefect-dask and distributed for --workers / --dask-address.
RUN pip install ".[dask]" && data-engine --help > /dev/null

# Never run the engine as root; HOME holds the Prefect profile and the per-worker model cache.
RUN useradd --create-home --uid 10001 engine
USER engine
WORKDIR /home/engine

CMD ["data-engine", "--help"]
