// django-oauth-toolkit, following `manage.py cleartokens` (clear_expired() in
// oauth2_provider/models.py):
// - a refresh token goes once revoked for longer than REFRESH_TOKEN_EXPIRE_SECONDS, here 24
//   hours (set the preset's marker grace to yours; DOT deletes no refresh token while that
//   setting is None). Deleting one sets accesstoken.source_refresh_token_id to NULL, as the
//   ORM's on_delete=SET_NULL does: the database keys are DEFERRABLE with no ON DELETE;
// - an expired access token goes unless a refresh token still points at it;
// - an expired ID token goes unless an access token still points at it;
// - an expired grant goes.
// Every column is timestamptz.
import type { Preset } from '../rule.js';

export const djangoOauthToolkit: Preset = {
  name: 'django-oauth-toolkit',
  follows: 'manage.py cleartokens (REFRESH_TOKEN_EXPIRE_SECONDS = 24 hours)',
  targets: [
    {
      table: 'oauth2_provider_refreshtoken',
      marker: { column: 'revoked', grace: '24 hours' },
      onReferenced: 'unlink',
    },
    {
      table: 'oauth2_provider_accesstoken',
      expiry: { column: 'expires' },
      onReferenced: 'keep',
    },
    {
      table: 'oauth2_provider_idtoken',
      expiry: { column: 'expires' },
      onReferenced: 'keep',
    },
    { table: 'oauth2_provider_grant', expiry: { column: 'expires' } },
  ],
};
