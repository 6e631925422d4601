# syntax=docker/dockerfile:1
#
# The session listener as a Render background worker (see render.yaml).
#   docker build -t listener .
#   docker run --rm --env-file .env listener          # = listener run
#   docker run --rm listener replay - < events.jsonl   # any other subcommand
#
# Every dependency ships a manylinux wheel for CPython 3.11 (pgserver, the
# embedded PostgreSQL, is the large one), so neither stage needs a compiler:
# the builder only exists so that pip, its cache and the sources stay out of
# the final image, which receives nothing but the virtual environment.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY listener ./listener

# A regular (non-editable) install: the venv holds the code, /src is dropped.
# --only-binary: fail loudly if a dependency ever needs compiling here.
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --only-binary=:all: . \
 && listener --help >/dev/null


FROM ${PYTHON_IMAGE}

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

# Non-root: nothing the listener does needs root.
RUN groupadd --system --gid 10001 listener \
 && useradd --system --uid 10001 --gid listener --home-dir /app --shell /usr/sbin/nologin listener \
 && install -d -o listener -g listener /app

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
USER listener:listener

# Exec form, no shell in between: `listener` (Python) is PID 1 and receives
# Render's SIGTERM itself; the daemon's own handler stops arming, releases its
# claims and the lease, and exits 0 well inside Render's 30 s shutdown delay.
STOPSIGNAL SIGTERM
ENTRYPOINT ["listener"]
CMD ["run"]
