-- token-reaper: target=notify transaction=yes source=notify
-- On each target with the prompt purge ("notify"), under PURGE_SOURCE=notify only: wal reads
-- the same changes from a replication slot, poll looks for them, and install drops the
-- trigger. It fires once per row, only when the row becomes marked (revoked, used, or an
-- active flag turned false) or stops being marked (an un-revoke, rare), and only after the
-- UPDATE: NOTIFY is delivered at commit, so a rolled-back revocation never notifies.
CREATE OR REPLACE TRIGGER token_reaper_notify_revoked
  AFTER UPDATE OF :"marker_column"
  ON :"schema".:"table"
  FOR EACH ROW
  WHEN (:marker_changed)
  EXECUTE FUNCTION token_reaper.notify_revoked(
    :'notify_channel', :'id_column', :'qualified_name'
  );
