-- A refresh-tokens table partitioned by day of expiry, for new deployments. Not applied by
-- `token-reaper install`: the auth service owns its tables; put this into its migrations.
--
-- token-reaper detects the partitioning and then, in every sweep, drops each partition whose
-- day has passed (one DROP TABLE however many rows it holds), deletes the revoked rows left in
-- the others, and makes partitions ahead of the longest token lifetime. Run
-- `npx token-reaper sweep` once right after creating the table: until then only today's
-- partition exists, and an insert whose expiry has no partition fails.
--
-- A primary key or unique constraint on a partitioned table must include the partition key,
-- because PostgreSQL enforces uniqueness one partition at a time. So the key is
-- (id, expires_at), and token_hash gets a plain index: its uniqueness comes from the hash
-- (a collision of 256-bit hashes is not a practical concern), not from a constraint. A
-- lookup by token_hash alone probes that index in every partition; with daily partitions
-- and 30-day tokens that is about 30 small index probes. Use weekly partitions to probe
-- fewer, or include expires_at in the lookup where the service knows it.
CREATE TABLE refresh_tokens (
  id uuid NOT NULL DEFAULT gen_random_uuid(),
  user_id uuid NOT NULL,
  token_hash text NOT NULL,
  revoked boolean NOT NULL DEFAULT false,
  expires_at timestamptz NOT NULL,
  created_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (id, expires_at)
) PARTITION BY RANGE (expires_at);

CREATE INDEX refresh_tokens_token_hash_idx ON refresh_tokens (token_hash);
-- The two indexes `token-reaper install` would otherwise build partition by partition.
CREATE INDEX refresh_tokens_expires_at_idx ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_revoked_idx ON refresh_tokens (id) WHERE revoked;

-- Today's partition (UTC days, named as token-reaper names the ones it makes).
DO $$
DECLARE
  day timestamptz := date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
BEGIN
  EXECUTE format(
    'CREATE TABLE %I PARTITION OF refresh_tokens FOR VALUES FROM (%L) TO (%L)',
    'refresh_tokens_p' || to_char(day AT TIME ZONE 'UTC', 'YYYYMMDD'), day, day + interval '1 day');
END
$$;
