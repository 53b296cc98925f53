# hydrod in a container. Built and run by deploy/compose.yaml (see deploy/README.md,
# "Containers"); alone: docker build -t hydrod . && docker run --env-file ... hydrod
#
# Stage 1 builds the wheel from pyproject.toml; stage 2 installs only that wheel and
# its dependencies, and runs as an unprivileged user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HYDROD_CONFIG=/etc/hydrod/config.toml
RUN useradd --system --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin hydrod
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The container's settings: broker and database by their compose service names, the
# HTTP API on every interface of the container. Secrets come from the environment
# (HYDROD_DATABASE_DSN, HYDROD_MQTT_PASSWORD, HYDROD_HTTP_TOKEN), never from this file.
COPY deploy/container.toml /etc/hydrod/config.toml
USER hydrod
EXPOSE 6001
# /healthz answers 200 when every actor works and MQTT and the database are reachable,
# 503 otherwise; urlopen raises on a 503, so the check fails. No curl in the image.
HEALTHCHECK --interval=15s --timeout=5s --start-period=40s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6001/healthz', timeout=4)"]
# SIGTERM drains and commits within supervisor.shutdown_timeout_s (20 s): give the
# container more than that to stop (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["hydrod"]
CMD ["run", "--config", "/etc/hydrod/config.toml"]
