-- token-reaper: target=refresh_tokens transaction=none index=refresh_tokens_expiry_index
-- Lets the sweep's expiry predicate, and partition maintenance, find expired rows without
-- reading the whole table. CONCURRENTLY: the auth service keeps writing while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS :"refresh_tokens_expiry_index"
  ON :"refresh_tokens_schema".:"refresh_tokens_table" (:"refresh_tokens_expires_at_column");
