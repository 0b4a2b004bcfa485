-- Run once, when the compose stack's Postgres volume is first initialised (as POSTGRES_USER, in
-- POSTGRES_DB, the Prefect server's database). MLflow's tracking store gets its own database.
CREATE DATABASE mlflow;
