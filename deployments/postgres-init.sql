-- Runs once, when the Postgres volume is first created (docker-entrypoint-initdb.d):
-- the Prefect server uses the database named by POSTGRES_DB; kbsync's own state
-- (cursors, checkpoints, failures) lives in a database of its own.
CREATE DATABASE kbsync;
