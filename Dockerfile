# One image for every role of the federation (docker-compose.yml): the SuperLink, a SuperNode per site, the
# one-shot data steps and the `flwr run` submitter. No site data goes into it (.dockerignore lets only the
# code in); sites mount their database at run time.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_CONSTRAINT=/etc/pip-constraints.txt \
    FLWR_HOME=/var/lib/flwr \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1
# torch's OpenMP threads wait passively, as under the fedmer command (client/runtime.py): a SuperNode shares its
# cores with other jobs, and spinning threads then starve each other
ENV OMP_WAIT_POLICY=PASSIVE

# torch 2.13.0, CPU build only. PyPI's torch wheel depends on the nvidia-* CUDA wheels (several GB), so:
# - with a wheel in deploy/wheels/ (a local copy of `torch-2.13.0+cpu-*.whl`, put there before
#   `docker compose build`), pip installs that file and nothing of torch is downloaded;
# - otherwise pip takes torch==2.13.0+cpu from PyTorch's CPU index (PyPI has no "+cpu" builds).
# The constraint (PIP_CONSTRAINT) then holds torch at the "+cpu" build: installing fedmer (torch==2.13.0) finds
# it satisfied, and no later install can swap in the CUDA build. Flower must not reinstall the app's
# dependencies at run time either (uv ignores pip's settings): FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1.
COPY deploy/wheels/ /wheels/
RUN echo "torch==2.13.0+cpu" > /etc/pip-constraints.txt \
    && wheel="$(ls /wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1)" \
    && pip install "${wheel:-torch==2.13.0+cpu}" --extra-index-url https://download.pytorch.org/whl/cpu

# The Flower app: `flwr run /app` builds it into the bundle that the SuperLink sends to the sites.
WORKDIR /app
COPY pyproject.toml README.md ./
COPY partitions/ partitions/
COPY models/ models/
COPY client/ client/
COPY server/ server/
RUN pip install .

# The `flwr` CLI's connection to the compose SuperLink (used by the `run` service).
COPY deploy/flwr-config.toml ${FLWR_HOME}/config.toml

# The ServerApp runs in the SuperLink's working directory: run directories land in /srv/fedmer/runs/.
WORKDIR /srv/fedmer
