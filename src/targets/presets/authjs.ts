// Auth.js with @auth/pg-adapter: it deletes an expired session when it is read (core
// lib/actions/session.ts), and a verification token when it is used; the rest stays. The
// preset deletes what Auth.js treats as gone: `expires` passed. accounts.expires_at (epoch
// seconds) is the provider's token expiry, not the account's, and is left alone.
import type { Preset } from '../rule.js';

export const authjs: Preset = {
  name: 'authjs',
  follows: 'Auth.js deleting expired sessions as it reads them (@auth/pg-adapter tables)',
  targets: [
    { table: 'sessions', expiry: { column: 'expires' } },
    { table: 'verification_token', expiry: { column: 'expires' } },
  ],
};
