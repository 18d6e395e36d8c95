// What a NOTIFY payload may say, and nothing more. Any role that can connect may NOTIFY on
// the channel, so a payload is a hint that cannot do harm: it names a row for the daemon to
// look at, and every value in it is checked here, against the column's type, so that no
// forged value can reach a statement and fail the batch it travels in. The time it carries
// only measures latency; the grace never counts from it (see revocations.ts).
import { qualifiedName } from '../relation.js';
import type { IdType, TableShape } from '../schema.js';

/** The trigger's payloads are about 150 characters; anything much longer is not one. */
export const MAXIMUM_PAYLOAD_CHARACTERS = 1_000;
/** The longest text id accepted: a hash or an opaque id, never a whole document. */
const MAXIMUM_TEXT_ID_CHARACTERS = 512;

export interface Revocation {
  id: string;
  /** The trigger's clock_timestamp() at the UPDATE, for the latency figure only. */
  revokedAt: string;
}

/** A payload's fields, once it is known to be a JSON object. */
export type PayloadFields = Readonly<Record<string, unknown>>;

/**
 * The payload's fields, or why it is not the trigger's. Every problem is a fixed text, so
 * that problems can be counted by kind (router.ts) and none echoes the payload.
 */
export function parsePayload(
  payload: string | undefined,
): { fields: PayloadFields } | { problem: string } {
  if (payload === undefined || payload === '') return { problem: 'empty payload' };
  if (payload.length > MAXIMUM_PAYLOAD_CHARACTERS) {
    return { problem: 'payload is too long to be the trigger’s' };
  }
  let parsed: unknown;
  try {
    parsed = JSON.parse(payload);
  } catch {
    return { problem: 'payload is not JSON' };
  }
  if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
    return { problem: 'payload is not a JSON object' };
  }
  return { fields: parsed as PayloadFields };
}

/** The names a payload for this table may carry: a partition's trigger names the partition. */
export function payloadTables(shape: Pick<TableShape, 'relation' | 'leaves'>): Set<string> {
  return new Set([qualifiedName(shape.relation), ...shape.leaves.map(qualifiedName)]);
}

/** A revocation of this table's, or why the payload is not one. Exported for tests. */
export function parseRevocation(
  payload: string | undefined,
  shape: Pick<TableShape, 'id' | 'relation' | 'leaves'>,
): Revocation | { problem: string } {
  const parsed = parsePayload(payload);
  if ('problem' in parsed) return parsed;
  const { table } = parsed.fields;
  if (typeof table !== 'string' || !payloadTables(shape).has(table)) {
    return { problem: 'payload names another table, or none' };
  }
  return validateRevocation(parsed.fields, shape);
}

export function validateRevocation(
  fields: PayloadFields,
  shape: Pick<TableShape, 'id'>,
): Revocation | { problem: string } {
  const { id, revoked_at: revokedAt } = fields;
  const idType = shape.id!.type;
  // Older triggers sent the id as a JSON number; only an exact one is taken.
  const idText = typeof id === 'number' && Number.isSafeInteger(id) ? String(id) : id;
  if (typeof idText !== 'string' || !isValidId(idText, idType)) {
    return { problem: `payload id is not a valid ${idType}` };
  }
  if (typeof revokedAt !== 'string' || !isIsoInstant(revokedAt)) {
    return { problem: 'payload revoked_at is not an ISO-8601 timestamp' };
  }
  return { id: idText, revokedAt };
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const INTEGER = /^-?\d{1,19}$/;
/** The magnitude just past each integer type's range: -2^(n-1) <= id < 2^(n-1). */
const INTEGER_LIMITS: Partial<Record<IdType, bigint>> = {
  smallint: 2n ** 15n,
  integer: 2n ** 31n,
  bigint: 2n ** 63n,
};

/** True when PostgreSQL will take the text as a value of the id column's type. */
export function isValidId(text: string, type: IdType): boolean {
  if (type === 'uuid') return UUID.test(text);
  const limit = INTEGER_LIMITS[type];
  if (limit !== undefined) {
    if (!INTEGER.test(text)) return false;
    const value = BigInt(text);
    return value >= -limit && value < limit;
  }
  // Text of any kind, except what PostgreSQL's text cannot hold.
  return text.length > 0 && text.length <= MAXIMUM_TEXT_ID_CHARACTERS && !text.includes('\0');
}

// What json_build_object writes for a timestamptz ("2026-12-05T14:42:23.123456+00:00"), and
// what Date#toISOString writes. Date.parse is no check: it takes "1", and rolls 30 February
// over into March, while PostgreSQL's cast rejects both and would fail the whole batch.
const ISO_INSTANT =
  /^(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2}):(\d{2})(?:\.\d{1,6})?(?:Z|[+-](\d{2})(?::?(\d{2}))?)$/;

/** True for an ISO-8601 instant with a real calendar date and an offset PostgreSQL takes. */
export function isIsoInstant(text: string): boolean {
  const match = ISO_INSTANT.exec(text);
  if (match === null) return false;
  const [year, month, day, hour, minute, second, offsetHours, offsetMinutes] = match
    .slice(1)
    .map((part) => (part === undefined ? 0 : Number(part))) as [
    number,
    number,
    number,
    number,
    number,
    number,
    number,
    number,
  ];
  const date = new Date(0);
  date.setUTCFullYear(year, month - 1, day);
  return (
    year >= 1 &&
    date.getUTCMonth() === month - 1 &&
    date.getUTCDate() === day &&
    hour <= 23 &&
    minute <= 59 &&
    second <= 59 &&
    offsetHours <= 15 &&
    offsetMinutes <= 59
  );
}
