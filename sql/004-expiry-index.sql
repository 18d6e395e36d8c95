-- token-reaper: target=expiry transaction=none index=expiry_index
-- On each target with an expiry: lets the expiry predicate, and partition maintenance, find
-- expired rows without reading the whole table. For a lifetime rule (created_at + 60
-- minutes) it is on the time the lifetime counts from. CONCURRENTLY: the auth service keeps
-- writing while it builds.
CREATE INDEX CONCURRENTLY IF NOT EXISTS :"expiry_index"
  ON :"schema".:"table" (:"expiry_column");
