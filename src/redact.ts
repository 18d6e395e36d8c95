// Secrets must never reach a log line: not a token, not a token hash, not the password in a
// connection URL. Redaction happens in one place, on the way out, so a careless log call
// elsewhere cannot leak one.

const URL_PASSWORD = /\b(postgres(?:ql)?:\/\/[^:/?#@\s]*:)[^@/?#\s]*@/gi;
// Whole key names only: a table called password_resets is not a secret.
const SECRET_KEY = /^(password|secret|token|token_?hash|token_?value|refresh_?token)$/i;

/** The URL with its password, if any, replaced by `***`. */
export function redactUrl(url: string): string {
  return url.replace(URL_PASSWORD, '$1***@');
}

/** A copy of `value` with passwords in URLs masked and secret-named fields dropped. */
export function redactSecrets(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return redactUrl(value);
  if (value === null || typeof value !== 'object' || depth > 8) return value;
  if (Array.isArray(value)) return value.map((item) => redactSecrets(item, depth + 1));
  const copy: Record<string, unknown> = {};
  for (const [key, member] of Object.entries(value)) {
    copy[key] = SECRET_KEY.test(key) ? '[redacted]' : redactSecrets(member, depth + 1);
  }
  return copy;
}
