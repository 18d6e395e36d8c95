// Ory Hydra, following `hydra janitor --tokens` (persistence/sql/persister_oauth2.go). The
// janitor deletes access and refresh rows whose `requested_at` is older than their lifespan;
// each row carries that moment as `expires_at`, which honours per-client lifespans too. A
// rotated refresh token (`active = false`) is kept on purpose, for reuse detection and the
// rotation grace: Hydra moves its `expires_at` 30 minutes (plus the grace) past the rotation,
// so it goes only then. `active` is therefore not a marker here. Hydra writes every
// timestamp in UTC, whatever its configuration, so the preset declares the zone.
import type { Preset } from '../rule.js';

const token = (table: string) => ({
  table,
  expiry: { column: 'expires_at' },
  timezone: 'UTC',
});

export const oryHydra: Preset = {
  name: 'ory-hydra',
  follows: 'hydra janitor --tokens (each row expires at its expires_at, UTC)',
  targets: [token('hydra_oauth2_access'), token('hydra_oauth2_refresh')],
};
