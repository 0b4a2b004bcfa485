# The Prefect server of infra/compose.yaml: Prefect's own image, with FastAPI held below 0.151.
# From FastAPI 0.151 on, an explicit JSON null in a request body is validated instead of taken as
# "use the default", and Prefect 3.8.8's client sends `"limit": null, "offset": null` on some
# calls: `prefect deploy` then fails with 422 on POST /api/work_pools/<pool>/workers/filter
# (after creating the first deployment). Prefect 3.8.8 itself wants fastapi>=0.139.
FROM prefecthq/prefect:3.8.8-python3.11
RUN python -m pip install --no-cache-dir "fastapi>=0.139,<0.151"
