# One image for every service; the command picks it: `churnguard serve ingest --host 0.0.0.0`.
# Build from the repository root: docker build -t churnguard:0.1.0 .
# PYTHON_IMAGE: any Debian bookworm image with Python 3.11 (`python`) and its venv module.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY pyproject.toml README.md ./
RUN mkdir shared services && touch shared/__init__.py services/__init__.py \
    && pip install . && pip uninstall -y churnguard
COPY shared/ shared/
COPY services/ services/
RUN pip install --no-deps . && python -c "import services.cli, shared.app"

FROM ${PYTHON_IMAGE}
# A numeric UID/GID, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 churnguard \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --no-create-home churnguard
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CHURNGUARD_LOG_FORMAT=json
# The root filesystem is read-only on Kubernetes: var/ (reports, SQLite when no database URL is
# set) and /tmp are emptyDir volumes there.
RUN mkdir -p /app/var && chown 10001:10001 /app/var
USER 10001:10001
EXPOSE 8000 8001 8002 8003
ENTRYPOINT ["churnguard"]
CMD ["--help"]
