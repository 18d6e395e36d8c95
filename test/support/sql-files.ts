// The files of sql/ that install applies on the reference schema, in order: what the install
// tests expect it to apply, record and print.
export const ALL_SQL_FILES = [
  '001-schema.sql',
  '002-notify-function.sql',
  '003-revoke-trigger.sql',
  '004-expiry-index.sql',
  '005-marker-index.sql',
  '007-revocations.sql',
  '008-sweep-positions.sql',
] as const;
