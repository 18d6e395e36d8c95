// Laravel Passport, following `php artisan passport:purge` (laravel/passport
// src/Console/PurgeCommand.php): per token table, `revoked = true OR expires_at < now - 168
// hours`. A revoked row goes at once: Passport treats a missing row as revoked. Laravel's own
// `auth:clear-resets` (DatabaseTokenRepository::deleteExpired) deletes password reset tokens
// older than `created_at` + 60 minutes. Every column is `timestamp(0) without time zone`,
// written in config('app.timezone'): NAIVE_TIMESTAMPS_TIMEZONE must say which.
import type { Preset } from '../rule.js';

const token = (table: string) => ({
  table,
  marker: { column: 'revoked' },
  expiry: { column: 'expires_at' },
  keepExpiredFor: '168 hours',
});

export const laravelPassport: Preset = {
  name: 'laravel-passport',
  follows: 'php artisan passport:purge (168 hours) and php artisan auth:clear-resets (60 minutes)',
  targets: [
    token('oauth_access_tokens'),
    token('oauth_refresh_tokens'),
    token('oauth_auth_codes'),
    // Passport 13 adds device codes, purged the same way.
    { ...token('oauth_device_codes'), optional: true },
    // Keyed by email; a used reset is deleted by Laravel itself, so only age matters here.
    {
      table: 'password_reset_tokens',
      expiry: { from: 'created_at', lifetime: '60 minutes' },
      optional: true,
    },
  ],
};
