# One image for every Python service of docker-compose.yml (balancer, substation agents, EV fleet,
# recorder, API, and the one-shot account generator); the compose service picks the command.
# The balancer's core and the contract's codec and topics compiled by mypyc (grid_runtime/native.py) in an image
# that has a C compiler; the runtime image takes only the builds (.build/native), each used while it matches the
# sources copied beside it.
FROM python:3.11.10-bookworm AS native
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir /app "mypy>=1.10" && python -m grid_runtime.native build grid_protocol \
    && python -m grid_runtime.native build balancer

FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# openssl: the one-shot "mqtt-accounts" service makes the broker's TLS certificates (broker/tls/make-certs.sh).
RUN apt-get update && apt-get install -y --no-install-recommends openssl && rm -rf /var/lib/apt/lists/*
# .dockerignore keeps the virtualenv, tests, run data and caches out of the build context.
COPY . /app
COPY --from=native /app/.build /app/.build
# Installs the dependencies and the packages. Commands run from /app, so `python -m <package>` finds
# the source here first (every package, package data included).
RUN pip install /app \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /app --shell /usr/sbin/nologin gridlb

# Non-root. The one-shot "mqtt-accounts" service overrides this (user: "0:0") to hand the broker's state file
# and key to the broker's user.
USER gridlb:gridlb

# /metrics: balancer 9101, substation agents 9102, EV fleet 9103, recorder 9104; API (and its /metrics) 8000
EXPOSE 9101 9102 9103 9104 8000
CMD ["python", "-m", "balancer"]
