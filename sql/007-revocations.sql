-- token-reaper: target=all transaction=yes
-- When revocation times must be kept (a grace on a marker, REFRESH_TOKEN_REVOKED_GRACE) and the table
-- marks a revoked token with a boolean, which carries no time, this is where the time is
-- kept: from the trigger's NOTIFY, or when the daemon first finds the row revoked. It lives
-- in the database, so a restart of the daemon does not restart anyone's grace. The columns
-- are prefixed so that, inside a subquery on the token table, they never capture its names.
CREATE TABLE IF NOT EXISTS token_reaper.revocations (
  reaper_relation text NOT NULL,
  reaper_token_id text NOT NULL,
  reaper_revoked_at timestamptz NOT NULL,
  PRIMARY KEY (reaper_relation, reaper_token_id)
);
