// The two default targets, described by the environment variables exactly as before the
// target model existed: refresh tokens (revoked or expired, with the revoke trigger) and
// password resets (used or expired). Where no name is configured, the conventions of
// hand-written SQL, Prisma and TypeORM are candidates, so a Prisma `RefreshToken` table with
// `"expiresAt"` needs no variable at all.
import type { QualifiedName, TargetRule } from './rule.js';

type Read = (name: string) => string | undefined;

export interface EnvironmentTargetsInput {
  read: Read;
  problems: string[];
  parseTableName: (variable: string, value: string) => QualifiedName;
  checkIdentifier: (variable: string, value: string) => void;
  revokedGraceSeconds: number;
}

/** The variables that describe the default targets: with a targets file they are a conflict. */
export const TARGET_VARIABLES = [
  'REFRESH_TOKENS_TABLE',
  'REFRESH_TOKENS_ID_COLUMN',
  'REFRESH_TOKENS_REVOKED_COLUMN',
  'REFRESH_TOKENS_EXPIRES_AT_COLUMN',
  'REFRESH_TOKEN_REVOKED_GRACE',
  'PASSWORD_RESETS_TABLE',
  'PASSWORD_RESETS_ID_COLUMN',
  'PASSWORD_RESETS_USED_COLUMN',
  'PASSWORD_RESETS_EXPIRES_AT_COLUMN',
] as const;

// snake_case SQL first, then Prisma (the model name, PascalCase), then TypeORM (the class name
// in snake_case, columns as the camelCase property names).
const CONVENTIONS = {
  refreshTokens: {
    tables: ['refresh_tokens', 'RefreshToken', 'refresh_token', 'RefreshTokens', 'refreshTokens'],
    markers: ['revoked', 'revoked_at', 'revokedAt', 'isRevoked', 'is_revoked'],
  },
  passwordResets: {
    tables: ['password_resets', 'PasswordReset', 'password_reset', 'PasswordResets'],
    markers: ['used', 'used_at', 'usedAt', 'isUsed', 'is_used'],
  },
  expiry: ['expires_at', 'expiresAt', 'expires'],
} as const;

export function readEnvironmentTargets(input: EnvironmentTargetsInput): TargetRule[] {
  const refreshTokens = readTarget(input, {
    label: 'refresh tokens',
    prefix: 'REFRESH_TOKENS',
    tableVariable: 'REFRESH_TOKENS_TABLE',
    markerVariable: 'REFRESH_TOKENS_REVOKED_COLUMN',
    tables: CONVENTIONS.refreshTokens.tables,
    markers: CONVENTIONS.refreshTokens.markers,
    graceSeconds: input.revokedGraceSeconds,
    notify: true,
  });
  const passwordResetsSetting = input.read('PASSWORD_RESETS_TABLE');
  if (passwordResetsSetting?.toLowerCase() === 'none') return [refreshTokens];
  const passwordResets = readTarget(input, {
    label: 'password resets',
    prefix: 'PASSWORD_RESETS',
    tableVariable: 'PASSWORD_RESETS_TABLE',
    markerVariable: 'PASSWORD_RESETS_USED_COLUMN',
    tables: CONVENTIONS.passwordResets.tables,
    markers: CONVENTIONS.passwordResets.markers,
    graceSeconds: 0,
    notify: false,
  });
  return [refreshTokens, passwordResets];
}

function readTarget(
  input: EnvironmentTargetsInput,
  target: {
    label: string;
    prefix: string;
    tableVariable: string;
    markerVariable: string;
    tables: readonly string[];
    markers: readonly string[];
    graceSeconds: number;
    notify: boolean;
  },
): TargetRule {
  const { read, checkIdentifier } = input;
  const column = (variable: string) => {
    const value = read(variable);
    if (value !== undefined) checkIdentifier(variable, value);
    return value;
  };
  const tableSetting = read(target.tableVariable);
  const idVariable = `${target.prefix}_ID_COLUMN`;
  const expiryVariable = `${target.prefix}_EXPIRES_AT_COLUMN`;
  const marker = column(target.markerVariable);
  const expiry = column(expiryVariable);
  return {
    label: target.label,
    table:
      tableSetting === undefined
        ? {
            candidates: target.tables.map((name) => ({ schema: null, name })),
            configured: false,
          }
        : {
            candidates: [input.parseTableName(target.tableVariable, tableSetting)],
            configured: true,
          },
    id: column(idVariable) ?? null,
    marker: {
      column:
        marker === undefined
          ? { candidates: target.markers, configured: false }
          : { candidates: [marker], configured: true },
      dead: null,
      graceSeconds: target.graceSeconds,
      graceFrom: null,
    },
    expiry: {
      kind: 'column',
      column:
        expiry === undefined
          ? { candidates: CONVENTIONS.expiry, configured: false }
          : { candidates: [expiry], configured: true },
      unit: null,
      unlessSet: null,
    },
    keepExpiredForSeconds: 0,
    notify: target.notify,
    timezone: null,
    onReferenced: null,
    allowCascade: false,
    optional: false,
    knobs: {
      table: target.tableVariable,
      id: idVariable,
      marker: target.markerVariable,
      expiry: expiryVariable,
      timezone: 'NAIVE_TIMESTAMPS_TIMEZONE',
      ...(target.notify ? {} : { disable: `${target.tableVariable}=none` }),
    },
  };
}
