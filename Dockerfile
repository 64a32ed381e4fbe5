# One image for every fedllm service; the compose file picks the command
# (`fedllm gateway`, `fedllm router`, `fedllm node --hospital st_mary`, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src

# Exactly the locked, hash-checked set the tests ran with (requirements/lock.txt pins the CPU
# build of torch, found on the PyTorch CPU index; pass TORCH_INDEX_URL for another mirror).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements ./requirements
RUN pip install --no-deps --require-hashes -r requirements/nodeps.txt \
 && pip install --require-hashes --extra-index-url "${TORCH_INDEX_URL}" -r requirements/lock.txt

COPY pyproject.toml README.md* ./
COPY schemas ./schemas
COPY fedllm ./fedllm
COPY services ./services
RUN pip install --no-deps --no-build-isolation .

RUN useradd --create-home --uid 10001 fedllm \
 && mkdir -p /var/lib/fedllm \
 && chown fedllm:fedllm /var/lib/fedllm
USER fedllm
WORKDIR /var/lib/fedllm
ENV FEDLLM_DATA_DIR=/var/lib/fedllm

CMD ["fedllm", "--help"]
