-- token-reaper: target=refresh_tokens transaction=yes
-- The revoke trigger's function. One function serves any table and channel: the trigger
-- passes the channel as TG_ARGV[0] and the name of the id column as TG_ARGV[1].
-- The payload carries the table, the row id and the database time of the revocation, and
-- never the token or its hash. clock_timestamp() rather than now(): the latency the daemon
-- reports should start at the UPDATE, not at the start of a long transaction.
CREATE OR REPLACE FUNCTION token_reaper.notify_revoked() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify(
    TG_ARGV[0],
    json_build_object(
      'table', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME,
      'id', to_jsonb(NEW) -> TG_ARGV[1],
      'revoked_at', clock_timestamp()
    )::text
  );
  RETURN NULL;
END
$$;
