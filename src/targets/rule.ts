// The target model. A target is a table, the column that identifies a row, and a dead rule;
// every path (sweep, dry run, purge, catch-up, partitions, explain) reads the same rule. A rule
// is data, never SQL: columns are named, durations are numbers, and predicates.ts is the only
// place that turns a rule into SQL.
//
// Rules come from the environment (the two default targets, environment.ts), from a file of
// targets (config-file.ts), or from a preset (presets/). At this stage nothing is known about
// the database: a column may be a list of candidates (the conventions of snake_case SQL, of
// Prisma and of TypeORM), and schema.ts picks the one that exists and checks its type.

/** A table name as configured: `table` or `schema.table`, each part used exactly as written. */
export interface QualifiedName {
  readonly schema: string | null;
  readonly name: string;
}

/** A target as a targets file or a preset writes it, before validation (config-file.ts). */
export type TargetEntry = Record<string, unknown>;

/** One column, or the conventional names to look for when none was configured. */
export interface ColumnChoice {
  readonly candidates: readonly string[];
  /** Whether the name was configured (only that name counts) or is a convention. */
  readonly configured: boolean;
}

export interface MarkerRule {
  readonly column: ColumnChoice;
  /**
   * For a boolean marker, the value that marks the row dead: true (`revoked`, `used`) or
   * false (an `active` flag). Null means true. A timestamp marker is dead once set and not in
   * the future, and takes no value.
   */
  readonly dead: boolean | null;
  /** How long a marked row is kept; 0 deletes at once. */
  readonly graceSeconds: number;
  /**
   * The time column the grace of a boolean marker counts from (Supabase's `updated_at`). Null:
   * a timestamp marker counts from its own time; a boolean one from the time the daemon
   * records when it first sees the row marked (token_reaper.revocations).
   */
  readonly graceFrom: string | null;
}

export type ExpiryRule =
  /** A time column, or an integer of epoch seconds or milliseconds. */
  (
    | {
        readonly kind: 'column';
        readonly column: ColumnChoice;
        readonly unit: 'seconds' | 'milliseconds' | null;
      }
    /** A base time plus a fixed lifetime: Laravel's resets are `created_at` + 60 minutes. */
    | { readonly kind: 'lifetime'; readonly from: string; readonly lifetimeSeconds: number }
    /** A base time plus a per-row number of seconds: Doorkeeper's `created_at` + `expires_in`. */
    | { readonly kind: 'lifetimeColumn'; readonly from: string; readonly secondsColumn: string }
  ) & {
    /**
     * A column that, while set (not NULL), keeps the row from expiring: Doorkeeper keeps the
     * refresh token in the access token's row, and an expired access token with a refresh token
     * is still a live refresh token.
     */
    readonly unlessSet: string | null;
  };

/** Where a setting of the target is written, so a problem names what to change. */
export interface TargetKnobs {
  readonly table: string;
  readonly id: string;
  readonly marker: string;
  readonly expiry: string;
  readonly timezone: string;
  /** How to say there is no such table, where the configuration has a way. */
  readonly disable?: string;
}

export interface TargetRule {
  /** For messages: `refresh tokens`, `targets[2] (laravel-passport)`. */
  readonly label: string;
  /** The table, or the conventional names to look for in the search_path. */
  readonly table: { readonly candidates: readonly QualifiedName[]; readonly configured: boolean };
  /** The column that identifies a row; null: `id`, else the single-column primary key. */
  readonly id: string | null;
  readonly marker: MarkerRule | null;
  readonly expiry: ExpiryRule | null;
  /** An expired row stays this long after its expiry (Passport's purge keeps 7 days). */
  readonly keepExpiredForSeconds: number;
  /** Whether the revoke trigger goes on this table; null: yes when there is a marker. */
  readonly notify: boolean | null;
  /** The zone of this target's timestamp-without-time-zone columns, over the global one. */
  readonly timezone: string | null;
  /**
   * Dead rows that another table still references through a foreign key without ON DELETE:
   * `keep` them (deleted once unreferenced), or `unlink` them (the referencing column is set
   * to NULL in the same statement, as Django's on_delete=SET_NULL does). Null: refuse.
   */
  readonly onReferenced: 'keep' | 'unlink' | null;
  /** Whether a foreign key with ON DELETE CASCADE may delete rows of other tables. */
  readonly allowCascade: boolean;
  /** A preset's table that a deployment may not have: missing, it is skipped with a note. */
  readonly optional: boolean;
  readonly knobs: TargetKnobs;
}

/** A preset: one auth system's tables, written in the format of the targets file. */
export interface Preset {
  readonly name: string;
  /** The cleanup command the preset follows, for explain and the docs. */
  readonly follows: string;
  readonly targets: readonly TargetEntry[];
}
