-- 001_jetfleet_jobs.sql — the ledger: one row per job (DESIGN.md "Ledger").
--
-- jetfleet-consumer applies the files of this directory that are missing,
-- in name order, each once and inside a transaction of its own (so no
-- BEGIN/COMMIT here), and records them in jetfleet_migrations (version =
-- the file name without ".sql"). A process holds an advisory lock while it
-- migrates, so several consumers may start at once.
--
-- Rows are written with INSERT … ON CONFLICT (job_id): a redelivered or
-- replayed job never makes a second row, and a succeeded row never changes.

CREATE TABLE jetfleet_jobs (
    job_id      text        PRIMARY KEY,
    service     text        NOT NULL,
    priority    text        NOT NULL DEFAULT 'normal'
                            CHECK (priority IN ('high', 'normal', 'low')),
    type        text        NOT NULL,
    tenant      text,
    status      text        NOT NULL
                            CHECK (status IN ('running', 'succeeded', 'dead')),
    attempts    integer     NOT NULL DEFAULT 0 CHECK (attempts >= 0), -- real calls made
    result      jsonb,                  -- the service's answer, when succeeded
    error       text,                   -- the last failure, one line
    stream_seq  bigint,                 -- JOBS sequence of the latest delivery
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz             -- when it became succeeded or dead
);

COMMENT ON TABLE jetfleet_jobs IS 'jetfleet ledger: one row per job id';

-- "How many jobs of service X are running / dead?"
CREATE INDEX jetfleet_jobs_service_status ON jetfleet_jobs (service, status);
-- "What changed in the last hour?"
CREATE INDEX jetfleet_jobs_updated_at ON jetfleet_jobs (updated_at);
