# The MLflow tracking server of infra/compose.yaml: MLflow with the Postgres driver (psycopg2,
# for --backend-store-uri postgresql://...) and boto3 (for --artifacts-destination s3://...),
# which MLflow's own image does not carry. The compose stack also runs its one-shot bucket
# creation with this image (boto3 is here). Build context: infra/.
ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
FROM ${PYTHON_IMAGE}
# Within the range alignflow's pyproject allows for the client (mlflow>=3.4,<3.18).
ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9,<3" "boto3>=1.35,<2"
EXPOSE 5000
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
