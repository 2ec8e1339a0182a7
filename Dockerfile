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
# [server]: the same image runs a team's tracking server on PostgreSQL with basic-auth (docs/deploy.md):
#   docker run --entrypoint mlflow -p 5000:5000 -e MLFLOW_AUTH_CONFIG_PATH=... IMAGE server --host 0.0.0.0 ...
RUN pip install --no-cache-dir "./[server]" \
    && useradd --create-home --uid 1000 medxfer

USER 1000
# mlflow server's port when the image runs the tracking server; medxfer itself listens on nothing.
EXPOSE 5000
WORKDIR /work
ENTRYPOINT ["medxfer"]
CMD ["--help"]
