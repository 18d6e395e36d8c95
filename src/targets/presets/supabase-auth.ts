// Supabase Auth, following its database cleanup (internal/models/cleanup.go): a revoked
// refresh token goes 24 hours after its `updated_at`, which the revocation sets; the refresh
// path needs it until then (a lost response, the reuse interval, revoking the whole family
// when a stolen token is replayed). A session goes 72 hours after its `not_after`, and its
// refresh tokens with it (ON DELETE CASCADE, as under Supabase's own cleanup). The tables
// have row-level security enabled: run token-reaper as their owner (supabase_auth_admin) or
// as a role with BYPASSRLS.
import type { Preset } from '../rule.js';

export const supabaseAuth: Preset = {
  name: 'supabase-auth',
  follows:
    'GoTrue database cleanup (refresh tokens 24 hours after revocation, sessions 72 hours after not_after)',
  targets: [
    {
      table: 'auth.refresh_tokens',
      marker: { column: 'revoked', grace: '24 hours', graceFrom: 'updated_at' },
    },
    {
      table: 'auth.sessions',
      expiry: { column: 'not_after' },
      keepExpiredFor: '72 hours',
      allowCascade: true,
    },
  ],
};
