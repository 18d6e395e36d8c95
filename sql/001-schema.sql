-- token-reaper: target=all transaction=yes
-- token-reaper's own schema, and the record of which of these files install has applied.
-- The checksum is of the file as rendered for this database, so a changed setting (another
-- channel, another table) makes install apply the file again; every file is idempotent.
CREATE SCHEMA IF NOT EXISTS token_reaper;

CREATE TABLE IF NOT EXISTS token_reaper.schema_version (
  version integer PRIMARY KEY,
  name text NOT NULL,
  checksum text NOT NULL,
  applied_at timestamptz NOT NULL DEFAULT now()
);
