# CPU image for running medxfer stages; mount your data and workspace.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/medxfer
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY models ./models
COPY data_specs ./data_specs
RUN pip install --no-cache-dir . \
    && useradd --create-home --uid 1000 medxfer

USER 1000
WORKDIR /work
ENTRYPOINT ["medxfer"]
CMD ["--help"]
