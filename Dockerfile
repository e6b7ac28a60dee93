# The one image of the service: `distill api`, `distill worker`, `distill reaper` and `distill db upgrade`.
#   docker build -t distillery .                       # PyTorch from the default package index
#   docker build -t distillery --build-arg TORCH_INDEX_URL=<PyTorch wheel index for your CUDA or CPU> .
FROM python:3.11-slim

# Empty: torch comes from the default index. Set it to PyTorch's own wheel index of the CUDA version
# (or the CPU-only build) you want.
ARG TORCH_INDEX_URL=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 distill
WORKDIR /app

# PyTorch first, from the chosen index, so that installing the project keeps it (and the layer is cached).
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "torch>=2.4,<3"; \
    else pip install "torch>=2.4,<3"; fi

COPY pyproject.toml README.md ./
COPY core ./core
COPY api ./api
COPY worker ./worker
COPY cli ./cli
COPY distillery ./distillery
COPY migrations ./migrations
# The mlflow extra: workers log tracked jobs to DISTILL_MLFLOW_TRACKING_URI.
RUN pip install ".[mlflow]"

# Named volumes mounted here start with this ownership, so the non-root user can write to them.
RUN mkdir -p /data/artifacts /models && chown -R distill:distill /data /models
USER distill

ENV DISTILL_HOME=/data \
    DISTILL_STORAGE_DIR=/data/artifacts \
    DISTILL_MODEL_ROOTS=/models
EXPOSE 8000
CMD ["distill", "api", "--host", "0.0.0.0", "--port", "8000"]
