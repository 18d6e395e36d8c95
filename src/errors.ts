// The errors the CLI maps to exit codes. A usage or configuration problem (exit 2) is
// something the operator fixes by changing a flag, a variable or the database schema;
// everything else is a runtime failure (exit 1).

/** Bad command-line usage or configuration. `problems` holds every problem found, one per line. */
export class ConfigurationError extends Error {
  override readonly name: string = 'ConfigurationError';
  constructor(readonly problems: readonly string[]) {
    super(problems.join('\n'));
  }
}

/** A target table, column or type that does not match what token-reaper can clean. */
export class SchemaError extends ConfigurationError {
  override readonly name: string = 'SchemaError';
}

/** The database's token_reaper schema is newer than this version of token-reaper knows. */
export class NewerSchemaVersionError extends ConfigurationError {
  override readonly name: string = 'NewerSchemaVersionError';
}

/** The database is a standby: nothing can be deleted there, and LISTEN is refused. */
export class StandbyError extends ConfigurationError {
  override readonly name: string = 'StandbyError';
  constructor() {
    super([
      'the database is a standby (pg_is_in_recovery() is true), and token-reaper needs the primary, where rows can be deleted. Point DATABASE_URL at the primary, or at a name that follows it across failovers.',
    ]);
  }
}
