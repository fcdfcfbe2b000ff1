# lm-eval-server: the README's launch line in a slim image, as a non-root user.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/app/.venv \
    DATA_DIR=/data

# git: lm-eval records the git hash of its working directory (harmless when absent).
# bubblewrap: the job sandbox (SANDBOX=auto uses it when the container runtime allows user
# namespaces; see docs/security.md for the runtime options it needs).
RUN apt-get update \
    && apt-get install -y --no-install-recommends git bubblewrap \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --no-cache-dir uv==0.13.9

WORKDIR /app
# Dependencies first (cached layer), exactly as locked, without the project or dev tools.
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-dev --no-install-project

COPY src ./src
COPY example.json ./
# The README's examples/tasks, shipped inside the package.
RUN ln -s src/lm_eval_server/examples examples && uv sync --frozen --no-dev

RUN useradd --create-home --uid 1000 lmeval \
    && mkdir -p /data \
    && chown -R lmeval:lmeval /data
USER lmeval
VOLUME ["/data"]

EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status == 200 else 1)"]

# The README's launch line (uv run without re-syncing: the image is already frozen).
CMD ["uv", "run", "--no-sync", "uvicorn", "src.main:app", "--host", "0.0.0.0", "--port", "8080"]
