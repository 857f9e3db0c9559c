# Two images from one file:
#   docker build -t tenebra .                             the gateway alone (the default target)
#   docker build -t tenebra-provider --target provider .  the standalone local provider
# The gateway image has no numpy or Pillow: without a provider key it refuses to start instead of
# rendering locally, so give it RUNWARE_API_KEY (Runware itself) or a --provider-url.

# Pinned to the patch release, so a rebuild gets the Python that was tested.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# What both images share: no build tools, no sources, a user without a login or a home.
FROM ${PYTHON_IMAGE} AS runtime
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN useradd --system --user-group --uid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin tenebra

FROM runtime AS provider
COPY --from=build /wheels /wheels
RUN wheel="$(echo /wheels/tenebra-*.whl)" \
    && pip install --no-cache-dir "${wheel}[provider]" \
    && rm -rf /wheels
USER tenebra
EXPOSE 8765
# The provider has no readiness route: accepting a connection is its health.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8765), 2).close()"]
ENTRYPOINT ["tenebra"]
CMD ["provider", "--host", "0.0.0.0", "--port", "8765"]

# Last, so that a plain `docker build` makes the gateway.
FROM runtime AS gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/tenebra-*.whl && rm -rf /wheels
USER tenebra
# Settings rather than flags, so TENEBRA_SERVER_PORT given at run time still counts (a flag would
# override it) and the health check below asks the port the server listens on.
ENV TENEBRA_SERVER_HOST=0.0.0.0 \
    TENEBRA_SERVER_PORT=8080
EXPOSE 8080
# /readyz is 200 only while a provider link is authenticated; urllib raises on 503 (slim has no
# curl).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['TENEBRA_SERVER_PORT']}/readyz\", timeout=2)"]
ENTRYPOINT ["tenebra"]
CMD ["serve"]
