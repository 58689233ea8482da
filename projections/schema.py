"""The read views' SQLite schema. Bump ``SCHEMA_VERSION`` when it changes: a database of another
version is rebuilt from the stream (projections are disposable, the stream is the truth)."""

SCHEMA_VERSION = 6

DDL = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoint (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    owner TEXT,
    param_pool TEXT NOT NULL DEFAULT '{}',
    max_parallel INTEGER,
    termination_reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    steps_total INTEGER NOT NULL DEFAULT 0,
    steps_succeeded INTEGER NOT NULL DEFAULT 0,
    steps_failed INTEGER NOT NULL DEFAULT 0,
    steps_cancelled INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS data_units (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    data_kind TEXT NOT NULL,
    ancestors TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    blob TEXT NOT NULL,
    step_id TEXT,
    seq INTEGER NOT NULL,
    added_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_owner ON runs (owner, created_at);
CREATE INDEX IF NOT EXISTS data_units_run ON data_units (run_id, seq);
CREATE TABLE IF NOT EXISTS steps (
    id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    operator TEXT NOT NULL,
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    inputs TEXT NOT NULL,
    outputs TEXT NOT NULL DEFAULT '[]',
    attempt INTEGER NOT NULL DEFAULT 0,
    target TEXT,
    external_id TEXT,
    error TEXT,
    seq INTEGER NOT NULL,
    scheduled_at TEXT NOT NULL,
    started_at TEXT,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS steps_run ON steps (run_id, seq);
CREATE TABLE IF NOT EXISTS step_attempts (
    step_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT,
    logs_blob TEXT,
    at TEXT NOT NULL,
    PRIMARY KEY (step_id, attempt)
);
CREATE TABLE IF NOT EXISTS data_kinds (name TEXT PRIMARY KEY, spec TEXT NOT NULL, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY, spec TEXT NOT NULL, revision INTEGER NOT NULL, seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS machines (
    name TEXT PRIMARY KEY, url TEXT NOT NULL, labels TEXT NOT NULL, has_token INTEGER NOT NULL,
    registered_at TEXT NOT NULL, updated_at TEXT NOT NULL, owner TEXT, shared_with TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY, principal TEXT NOT NULL, role TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
    description TEXT NOT NULL, created_by TEXT NOT NULL, created_at TEXT NOT NULL, revoked_at TEXT
);
CREATE TABLE IF NOT EXISTS webhooks (
    id TEXT PRIMARY KEY, url TEXT NOT NULL, types TEXT NOT NULL, runs TEXT NOT NULL, description TEXT NOT NULL,
    owner TEXT,
    status TEXT NOT NULL, secret_ref TEXT NOT NULL, previous_secret_ref TEXT, grace_until TEXT,
    secret_rotated_at TEXT, failing_since TEXT, last_error TEXT, created_seq INTEGER NOT NULL,
    version INTEGER NOT NULL,
    created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
"""

VIEW_TABLES = ("runs", "data_units", "steps", "step_attempts", "data_kinds", "operators", "machines", "webhooks", "tokens")
