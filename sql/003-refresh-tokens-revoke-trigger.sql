-- token-reaper: target=refresh_tokens transaction=yes
-- Fires once per row, only when the row goes from not revoked to revoked, and only after
-- the UPDATE: NOTIFY is delivered at commit, so a rolled-back revocation never notifies.
CREATE OR REPLACE TRIGGER token_reaper_notify_revoked
  AFTER UPDATE OF :"refresh_tokens_revoked_column"
  ON :"refresh_tokens_schema".:"refresh_tokens_table"
  FOR EACH ROW
  WHEN (:refresh_tokens_revoked_condition)
  EXECUTE FUNCTION token_reaper.notify_revoked(
    :'notify_channel', :'refresh_tokens_id_column', :'refresh_tokens_qualified_name'
  );
