-- The sse-gateway transactional outbox (installed by `sse-gateway pg-bridge install`).
-- Safe to apply again: every statement is idempotent. __CHANNEL__ is the NOTIFY channel.

CREATE SEQUENCE IF NOT EXISTS sse_outbox_commit_seq;

CREATE TABLE IF NOT EXISTS sse_outbox (
    id bigserial PRIMARY KEY,
    txid xid8 NOT NULL DEFAULT pg_current_xact_id(),
    seq bigint,            -- commit order: set just before the writing transaction commits
    topics text[] NOT NULL CHECK (cardinality(topics) > 0),
    event text,
    data jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    sent_at timestamptz
);

CREATE INDEX IF NOT EXISTS sse_outbox_unsent ON sse_outbox (seq, id) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS sse_outbox_txid ON sse_outbox (txid) WHERE seq IS NULL;

-- Write one event in the caller's transaction; it leaves only if that transaction commits.
CREATE OR REPLACE FUNCTION sse_emit(topics text[], event text, data jsonb) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    new_id bigint;
BEGIN
    -- Refused here, in the writer's transaction, rather than by the publish later (a row that
    -- can never be published would hold back every row after it).
    IF cardinality(topics) IS NULL OR cardinality(topics) = 0 OR EXISTS (
        SELECT FROM unnest(topics) AS t
        WHERE t IS NULL OR length(t) > 256 OR t !~ '^[A-Za-z0-9_.:/@-]+$'
    ) THEN
        RAISE EXCEPTION 'sse_emit: invalid topics %', topics USING ERRCODE = '22023',
            HINT = 'one or more topics of 1-256 characters from A-Z a-z 0-9 _ . : / @ -';
    END IF;
    IF event = '' OR event ~ '[\r\n]' THEN
        RAISE EXCEPTION 'sse_emit: invalid event name %', quote_literal(event)
            USING ERRCODE = '22023', HINT = 'a non-empty name without CR or LF';
    END IF;
    IF data IS NULL THEN
        data := 'null'::jsonb;
    END IF;
    INSERT INTO sse_outbox (topics, event, data) VALUES (topics, event, data)
    RETURNING id INTO new_id;
    PERFORM pg_notify('__CHANNEL__', '');  -- delivered on commit only
    RETURN new_id;
END;
$$;

-- Runs at commit time (a deferred constraint trigger): the lock serialises the commits of
-- transactions that wrote to the outbox, from this point to their end, so `seq` order is
-- their commit order and a transaction with a lower seq is always visible before a higher one.
CREATE OR REPLACE FUNCTION sse_outbox_seal() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1397966165, 1);
    UPDATE sse_outbox SET seq = nextval('sse_outbox_commit_seq')
    WHERE txid = pg_current_xact_id() AND seq IS NULL;
    RETURN NULL;
END;
$$;

DROP TRIGGER IF EXISTS sse_outbox_seal ON sse_outbox;
CREATE CONSTRAINT TRIGGER sse_outbox_seal AFTER INSERT ON sse_outbox
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION sse_outbox_seal();

-- A generic row trigger:
--   CREATE TRIGGER sources_sse AFTER INSERT OR UPDATE OR DELETE ON sources
--   FOR EACH ROW EXECUTE FUNCTION sse_row_change('source', 'project:{project_id}');
-- The first argument names the event (`source.insert`, `source.update`, `source.delete`); the
-- others are topic templates whose {column} parts take the row's values. The data is
-- {"op": ..., "table": ..., "row": <the new row, or the old one for a delete>}.
CREATE OR REPLACE FUNCTION sse_row_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb;
    op text := lower(TG_OP);
    topics text[] := '{}';
    t text;
    m text[];
BEGIN
    IF TG_NARGS < 2 THEN
        RAISE EXCEPTION 'sse_row_change(event, topic template, ...) needs a topic template';
    END IF;
    IF TG_OP = 'DELETE' THEN r := to_jsonb(OLD); ELSE r := to_jsonb(NEW); END IF;
    FOREACH t IN ARRAY TG_ARGV[1:] LOOP
        FOR m IN SELECT regexp_matches(t, '\{([A-Za-z0-9_]+)\}', 'g') LOOP
            t := replace(t, '{' || m[1] || '}', coalesce(r ->> m[1], ''));
        END LOOP;
        topics := topics || t;
    END LOOP;
    PERFORM sse_emit(topics, TG_ARGV[0] || '.' || op,
                     jsonb_build_object('op', op, 'table', TG_TABLE_NAME, 'row', r));
    RETURN NULL;
END;
$$;
