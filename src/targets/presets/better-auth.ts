// better-auth: it has no sweep. It deletes an expired session when its cookie is read, and
// every expired verification on each lookup (internal-adapter.ts); what nobody reads again
// stays. The preset deletes what better-auth itself treats as gone: `"expiresAt"` passed.
// With session.preserveSessionInDatabase, ended sessions are kept for audit with
// `"expiresAt" = now`; leave sessions out then ("only": ["verification"]).
import type { Preset } from '../rule.js';

export const betterAuth: Preset = {
  name: 'better-auth',
  follows: 'better-auth deleting expired sessions and verifications as it reads them',
  targets: [
    { table: 'session', expiry: { column: 'expiresAt' } },
    { table: 'verification', expiry: { column: 'expiresAt' } },
  ],
};
