// Doorkeeper, following `rake doorkeeper:db:cleanup` (lib/doorkeeper/rake/db.rake and
// StaleRecordsCleaner): revoked rows (`revoked_at` set and past) go, and expired ones, where
// expired is `created_at + expires_in` seconds (NULL never expires). A token row that holds a
// refresh token never expires: the refresh token lives in the same row and has no expiry of
// its own, so it goes only once revoked. Columns are `timestamp(6) without time zone`,
// written in ActiveRecord.default_timezone (UTC unless changed): declare it with
// NAIVE_TIMESTAMPS_TIMEZONE.
import type { Preset } from '../rule.js';

export const doorkeeper: Preset = {
  name: 'doorkeeper',
  follows:
    'rake doorkeeper:db:cleanup (revoked_tokens, expired_tokens, revoked_grants, expired_grants)',
  targets: [
    {
      table: 'oauth_access_tokens',
      marker: { column: 'revoked_at' },
      expiry: {
        from: 'created_at',
        lifetimeSecondsColumn: 'expires_in',
        unlessSet: 'refresh_token',
      },
    },
    {
      table: 'oauth_access_grants',
      marker: { column: 'revoked_at' },
      expiry: { from: 'created_at', lifetimeSecondsColumn: 'expires_in' },
      // doorkeeper-openid_connect's oauth_openid_requests rows cascade with their grant, as
      // they do under Doorkeeper's own cleanup.
      allowCascade: true,
    },
  ],
};
