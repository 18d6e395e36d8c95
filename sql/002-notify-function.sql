-- token-reaper: target=all transaction=yes source=notify
-- The revoke trigger's function, under PURGE_SOURCE=notify only (install drops it under wal
-- and poll). One function serves any table and channel: the trigger passes the channel as
-- TG_ARGV[0], the name of the id column as TG_ARGV[1], and the table's name as TG_ARGV[2].
-- On a partitioned table the trigger fires on the partition, whose own name the daemon may
-- not know yet (one made since it started); the argument, cloned with the trigger into every
-- partition, names the table the daemon was configured with.
-- The payload carries the table, the row id and the database time of the revocation, and
-- never the token or its hash. The id goes as text (->>): a bigint past 2^53 would lose
-- digits as a JSON number. clock_timestamp() rather than now(): the latency the daemon
-- reports should start at the UPDATE, not at the start of a long transaction.
CREATE OR REPLACE FUNCTION token_reaper.notify_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify(
    TG_ARGV[0],
    json_build_object(
      'table', coalesce(TG_ARGV[2], TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME),
      'id', to_jsonb(NEW) ->> TG_ARGV[1],
      'revoked_at', clock_timestamp()
    )::text
  );
  RETURN NULL;
END
$$;
