# iii-twisted engine image: slim, non-root, with a health check.
# Build:  docker build -t iii-twisted .
# Run:    docker run -p 49134:49134 -p 3111:3111 -v iii-data:/var/lib/iii iii-twisted
# See docs/deployment.rst.

# Wheels are built in a throw-away stage that has a compiler (for optional C
# extensions of dependencies); the final image installs them and nothing else.
FROM python:3.12-slim AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.cfg README.rst ./
COPY iii_twisted ./iii_twisted
COPY twisted ./twisted
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    III_HEALTH_URL=http://127.0.0.1:3111/_iii/health/ready
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels iii-twisted \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/iii \
       --create-home --shell /usr/sbin/nologin iii
COPY iii-config.yaml /etc/iii/iii-config.yaml
# Relative data paths of the config (./data/state) resolve here; mount a volume.
WORKDIR /var/lib/iii
VOLUME ["/var/lib/iii"]
USER 10001:10001
# Workers, REST API, stream clients.
EXPOSE 49134 3111 3112
# twist (not twistd): stays in the foreground, logs text to stdout (log_format).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-m", "iii_twisted.healthcheck"]
CMD ["twist", "iii", "--config", "/etc/iii/iii-config.yaml"]
