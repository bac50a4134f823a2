-- The MLflow database is created by the image (POSTGRES_DB); the Prefect server gets its own.
CREATE DATABASE prefect;
