// The file of targets (`--config PATH` or TOKEN_REAPER_CONFIG): JSON, validated with zod,
// every problem reported at once. Presets are written in the same format as the file, so a
// preset entry is expanded first, the entry's own keys laid over each of its targets, and
// then every target goes through the one schema below.
//
//   { "targets": [
//       { "preset": "laravel-passport" },
//       { "table": "auth.sessions", "id": "id",
//         "marker": { "column": "active", "dead": false, "grace": "24 hours", "graceFrom": "updated_at" },
//         "expiry": { "column": "expires_at" },
//         "keepExpiredFor": "7 days", "notify": true } ] }
import { z } from 'zod';
import { DURATION_HELP, parseDuration } from './duration.js';
import { PRESETS, PRESET_NAMES } from './presets/index.js';
import type { ExpiryRule, QualifiedName, TargetEntry, TargetRule } from './rule.js';

export interface TargetFileContext {
  /** For messages: the file's path. */
  source: string;
  parseTableName: (label: string, value: string) => QualifiedName | null;
  isIdentifier: (value: string) => boolean;
  isTimezone: (value: string) => boolean;
}

const identifier = (context: TargetFileContext) =>
  z.string().refine(context.isIdentifier, {
    message: 'is not a column name (letters, digits, _ or $, at most 63 bytes)',
  });

const duration = z.string().refine((value) => parseDuration(value) !== null, {
  message: `is not a duration. ${DURATION_HELP}`,
});

function targetSchema(context: TargetFileContext) {
  const column = identifier(context);
  const marker = z
    .object({
      column,
      dead: z.boolean().optional(),
      grace: duration.optional(),
      graceFrom: column.optional(),
    })
    .strict();
  const expiry = z
    .object({
      column: column.optional(),
      unit: z.enum(['seconds', 'milliseconds']).optional(),
      from: column.optional(),
      lifetime: duration.optional(),
      lifetimeSecondsColumn: column.optional(),
      unlessSet: column.optional(),
    })
    .strict()
    .superRefine((value, issues) => {
      const form =
        value.column !== undefined
          ? value.from === undefined &&
            value.lifetime === undefined &&
            value.lifetimeSecondsColumn === undefined
          : value.from !== undefined &&
            value.unit === undefined &&
            (value.lifetime === undefined) !== (value.lifetimeSecondsColumn === undefined);
      if (!form) {
        issues.addIssue({
          code: z.ZodIssueCode.custom,
          message:
            'takes one of { "column": C } (an integer column also needs "unit": "seconds" or "milliseconds"), { "from": C, "lifetime": "60 minutes" } or { "from": C, "lifetimeSecondsColumn": C2 }',
        });
      }
    });
  return z
    .object({
      table: z.string(),
      id: column.optional(),
      marker: marker.nullable().optional(),
      expiry: expiry.nullable().optional(),
      keepExpiredFor: duration.optional(),
      notify: z.boolean().optional(),
      timezone: z
        .string()
        .refine(context.isTimezone, { message: 'is not a known IANA time zone' })
        .optional(),
      onReferenced: z.enum(['keep', 'unlink']).optional(),
      allowCascade: z.boolean().optional(),
      optional: z.boolean().optional(),
    })
    .strict()
    .refine((value) => value.marker != null || value.expiry != null, {
      message: 'has neither a marker nor an expiry, so no row of it could ever be dead',
    });
}

const presetKeys = new Set(['preset', 'only', 'schema']);

/** The targets of a file's parsed JSON; problems are pushed, each naming its place. */
export function readTargetFile(
  content: unknown,
  context: TargetFileContext,
  problems: string[],
): TargetRule[] {
  const fileShape = z.object({ targets: z.array(z.record(z.unknown())).min(1) }).strict();
  const file = fileShape.safeParse(content);
  if (!file.success) {
    for (const issue of file.error.issues) problems.push(describeIssue(context.source, issue));
    return [];
  }
  const schema = targetSchema(context);
  const targets: TargetRule[] = [];
  file.data.targets.forEach((entry, index) => {
    const place = `targets[${index}]`;
    for (const expanded of expandPreset(entry, place, context.source, problems)) {
      const parsed = schema.safeParse(expanded.entry);
      if (!parsed.success) {
        for (const issue of parsed.error.issues) {
          problems.push(describeIssue(context.source, issue, expanded.place));
        }
        continue;
      }
      const table = context.parseTableName(`${expanded.place}.table`, parsed.data.table);
      if (table === null) {
        problems.push(
          `${context.source}: ${expanded.place}.table ${JSON.stringify(parsed.data.table)} is not a table name. Use table or schema.table, used exactly as written (case-sensitive).`,
        );
        continue;
      }
      targets.push(toRule(parsed.data, table, expanded.place));
    }
  });
  return targets;
}

function expandPreset(
  entry: TargetEntry,
  place: string,
  source: string,
  problems: string[],
): { entry: TargetEntry; place: string }[] {
  if (entry.preset === undefined) {
    for (const key of ['only', 'schema']) {
      if (key in entry) {
        problems.push(`${source}: ${place}.${key} is only for a preset entry.`);
      }
    }
    return [{ entry, place }];
  }
  const name = entry.preset;
  const preset = typeof name === 'string' ? PRESETS.get(name) : undefined;
  if (preset === undefined) {
    problems.push(
      `${source}: ${place}.preset ${JSON.stringify(name)} is not a preset. Use one of ${PRESET_NAMES.join(', ')}, or describe the table with "table", "marker" and "expiry".`,
    );
    return [];
  }
  const only = entry.only;
  const tables = preset.targets.map((target) => String(target.table));
  const named = (target: TargetEntry, table: unknown) =>
    target.table === table || String(target.table).split('.').pop() === table;
  if (
    only !== undefined &&
    (!Array.isArray(only) ||
      only.some((table) => !preset.targets.some((target) => named(target, table))))
  ) {
    problems.push(
      `${source}: ${place}.only must list tables of the ${preset.name} preset: ${tables.join(', ')}.`,
    );
    return [];
  }
  const chosen = preset.targets.filter(
    (target) => only === undefined || (only as unknown[]).some((table) => named(target, table)),
  );
  const overrides = Object.fromEntries(
    Object.entries(entry).filter(([key]) => !presetKeys.has(key)),
  );
  if ('table' in overrides && chosen.length > 1) {
    problems.push(
      `${source}: ${place}.table renames one table, and the ${preset.name} preset has ${chosen.length}. Add "only": ["<its table>"] to the entry.`,
    );
    return [];
  }
  const schema = typeof entry.schema === 'string' ? entry.schema : null;
  return chosen.map((target) => {
    const merged: TargetEntry = { ...target, ...overrides };
    // A marker merges key by key, so that a preset's grace can change alone.
    if (isObject(target.marker) && isObject(overrides.marker)) {
      merged.marker = { ...target.marker, ...overrides.marker };
    }
    if (schema !== null && !('table' in overrides)) {
      merged.table = `${schema}.${String(target.table).split('.').pop()}`;
    }
    return { entry: merged, place: `${place} (${preset.name}: ${String(target.table)})` };
  });
}

type ParsedTarget = z.infer<ReturnType<typeof targetSchema>>;

function toRule(target: ParsedTarget, table: QualifiedName, place: string): TargetRule {
  const seconds = (value: string | undefined) => (value === undefined ? 0 : parseDuration(value)!);
  let expiry: ExpiryRule | null = null;
  const unlessSet = target.expiry?.unlessSet ?? null;
  if (target.expiry?.column !== undefined) {
    expiry = {
      kind: 'column',
      column: { candidates: [target.expiry.column], configured: true },
      unit: target.expiry.unit ?? null,
      unlessSet,
    };
  } else if (target.expiry?.lifetime !== undefined) {
    expiry = {
      kind: 'lifetime',
      from: target.expiry.from!,
      lifetimeSeconds: seconds(target.expiry.lifetime),
      unlessSet,
    };
  } else if (target.expiry?.lifetimeSecondsColumn !== undefined) {
    expiry = {
      kind: 'lifetimeColumn',
      from: target.expiry.from!,
      secondsColumn: target.expiry.lifetimeSecondsColumn,
      unlessSet,
    };
  }
  return {
    label: place,
    table: { candidates: [table], configured: true },
    id: target.id ?? null,
    marker: target.marker
      ? {
          column: { candidates: [target.marker.column], configured: true },
          dead: target.marker.dead ?? null,
          graceSeconds: seconds(target.marker.grace),
          graceFrom: target.marker.graceFrom ?? null,
        }
      : null,
    expiry,
    keepExpiredForSeconds: seconds(target.keepExpiredFor),
    notify: target.notify ?? null,
    timezone: target.timezone ?? null,
    onReferenced: target.onReferenced ?? null,
    allowCascade: target.allowCascade ?? false,
    optional: target.optional ?? false,
    knobs: {
      table: `${place}.table`,
      id: `${place}.id`,
      marker: `${place}.marker`,
      expiry: `${place}.expiry`,
      timezone: `${place}.timezone or NAIVE_TIMESTAMPS_TIMEZONE`,
    },
  };
}

function describeIssue(source: string, issue: z.ZodIssue, place?: string) {
  const path = issue.path
    .map((part) => (typeof part === 'number' ? `[${part}]` : `.${part}`))
    .join('')
    .replace(/^\./, '');
  const where = [place, path].filter(Boolean).join(place && path ? '.' : '');
  return `${source}: ${where || 'the file'} ${issue.message.replace(/^Unrecognized key\(s\) in object/, 'has unknown key(s)')}`;
}

function isObject(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value);
}
