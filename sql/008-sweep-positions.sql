-- token-reaper: target=all transaction=yes
-- Where an unfinished sweep stopped (SWEEP_MAX_DURATION, a stop, a restart), so that the next
-- sweep resumes each table there instead of reading again from page 0 (src/sweep/positions.ts).
-- One row per relation walked: the table, or each leaf of a partitioned one. filenode is the
-- relation's file when the position was saved: a table rewritten since starts from 0. The
-- rows of a table are deleted once its walk is complete.
CREATE TABLE IF NOT EXISTS token_reaper.sweep_positions (
  target text NOT NULL,
  relation text NOT NULL,
  filenode oid NOT NULL,
  next_page integer NOT NULL,
  saved_at timestamptz NOT NULL DEFAULT now(),
  PRIMARY KEY (target, relation)
);
