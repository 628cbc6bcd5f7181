-- deploy/postgres/roles.sql — least-privilege PostgreSQL roles for jetfleet.
--
--   jetfleet_owner     owns the ledger's tables: the role a consumer uses
--                      when it applies schemas/postgres/*.sql (the first
--                      start, and the first start after an upgrade that
--                      brings a migration);
--   jetfleet_consumer  every consumer's everyday role: reads and writes
--                      ledger rows; no DDL, no DELETE or TRUNCATE;
--   jetfleet_reader    `jetfleet-publisher status` and the intake's
--                      GET /jobs/{id}: reads the ledger.
--
-- Run it as a superuser (or a role with CREATEROLE that owns the database
-- and schema public) in the jetfleet database, with psql. It can be run any
-- number of times:
--
--   psql -v ON_ERROR_STOP=1 -d jetfleet -f deploy/postgres/roles.sql
--   psql -d jetfleet -c '\password jetfleet_owner'     (and the two others)
--   jetfleet-consumer with dsn "… user=jetfleet_owner" until "consumer ready",
--     then stop it: the migrations are applied
--   psql -v ON_ERROR_STOP=1 -d jetfleet -f deploy/postgres/roles.sql
--     again: the grants on the tables that now exist
--   consumers run with dsn "… user=jetfleet_consumer"
--
-- Passwords are never written here: set them with \password (it sends only
-- a SCRAM verifier) and give them to the programs through PGPASSWORD or a
-- ~/.pgpass file rather than the dsn.

SELECT format('CREATE ROLE %I LOGIN', r)
  FROM unnest(ARRAY['jetfleet_owner', 'jetfleet_consumer', 'jetfleet_reader']) AS r
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

-- Nobody else may connect or create objects; PostgreSQL 14 and older let
-- every role create tables in schema public by default.
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
GRANT CONNECT ON DATABASE :"DBNAME" TO jetfleet_owner, jetfleet_consumer, jetfleet_reader;
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO jetfleet_owner;
GRANT USAGE ON SCHEMA public TO jetfleet_consumer, jetfleet_reader;

-- The tables, once jetfleet_owner has created them. The ledger writes
-- with INSERT … ON CONFLICT DO UPDATE … RETURNING, which needs SELECT,
-- INSERT and UPDATE; a consumer only reads jetfleet_migrations (to see
-- that every migration is applied).
DO $$
BEGIN
    IF to_regclass('public.jetfleet_jobs') IS NULL THEN
        RAISE NOTICE 'jetfleet_jobs does not exist yet: start one consumer as jetfleet_owner, '
                     'then run this file again';
        RETURN;
    END IF;
    GRANT SELECT, INSERT, UPDATE ON public.jetfleet_jobs TO jetfleet_consumer;
    GRANT SELECT ON public.jetfleet_migrations TO jetfleet_consumer;
    GRANT SELECT ON public.jetfleet_jobs TO jetfleet_reader;
END
$$;
