-- token-reaper: target=notify transaction=none index=marker_index
-- On each target with the prompt purge, under every PURGE_SOURCE: a partial index on marked
-- rows only. It stays tiny, because marked rows are deleted within milliseconds, and it makes
-- the catch-up on every (re)connect, and each poll of PURGE_SOURCE=poll, cheap.
CREATE INDEX CONCURRENTLY IF NOT EXISTS :"marker_index"
  ON :"schema".:"table" (:"id_column")
  WHERE :marker_index_predicate;
