-- token-reaper: target=refresh_tokens transaction=none index=refresh_tokens_revoked_index
-- A partial index on revoked rows only: it stays tiny, because revoked rows are deleted
-- within milliseconds, and it makes the listener's catch-up on every (re)connect cheap.
CREATE INDEX CONCURRENTLY IF NOT EXISTS :"refresh_tokens_revoked_index"
  ON :"refresh_tokens_schema".:"refresh_tokens_table" (:"refresh_tokens_id_column")
  WHERE :refresh_tokens_revoked_predicate;
