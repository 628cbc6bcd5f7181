-- 002_replays.sql — the ledger records reprocessing (issue 4: replay and
-- dead-letter re-drive).
--
-- `jetfleet-publisher replay` and `dlq redrive` republish a job with the
-- header Jetfleet-Replay-Of-Seq or Jetfleet-Redrive-Of. The first delivery
-- of such a message resets the job's row (whatever its status) to running
-- with attempts = 1, counts it in `replays` and stamps `replayed_at`; the
-- reset is keyed on the message's stream_seq, so a redelivery of the same
-- replayed message is one more attempt, not another replay.
--
-- Applied by jetfleet-consumer like 001 (in a transaction of its own).

ALTER TABLE jetfleet_jobs
    ADD COLUMN IF NOT EXISTS replays     integer NOT NULL DEFAULT 0 CHECK (replays >= 0),
    ADD COLUMN IF NOT EXISTS replayed_at timestamptz;

COMMENT ON COLUMN jetfleet_jobs.replays IS
    'times the job was replayed or re-driven (jetfleet-publisher replay / dlq redrive)';
COMMENT ON COLUMN jetfleet_jobs.replayed_at IS 'when the latest replay or re-drive began';
