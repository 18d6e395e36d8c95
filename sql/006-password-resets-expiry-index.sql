-- token-reaper: target=password_resets transaction=none index=password_resets_expiry_index
-- The same expiry index for password resets.
CREATE INDEX CONCURRENTLY IF NOT EXISTS :"password_resets_expiry_index"
  ON :"password_resets_schema".:"password_resets_table" (:"password_resets_expires_at_column");
