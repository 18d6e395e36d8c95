// Secrets must never reach a log line or the terminal: not a token, not a token hash, not a
// database password in any of the forms a connection string can carry one. Redaction happens in
// one place, on the way out (the logger's format and the CLI's error output), so a careless log
// call, or a library's error message that quotes its input, cannot leak one.

const MASK = '***';

// A password by name: password, passwd, passphrase, pass or pwd, alone or behind ssl, pg or db
// (libpq's sslpassword, the environment's PGPASSWORD, db_password). The other names are what a
// token is called. Whole names only: a table called password_resets is not a secret, nor is a
// parameter called bypass.
const PASSWORD_NAME = String.raw`(?:(?:ssl|pg|db|database)[_.-]?)?(?:password|passwd|passphrase|pass|pwd)`;
const TOKEN_NAME = String.raw`secret|token|token_?hash|token_?value|refresh_?token`;
const SECRET_NAME = `(?:${PASSWORD_NAME}|${TOKEN_NAME})`;
const SECRET_KEY = new RegExp(`^${SECRET_NAME}$`, 'i');

// A URL is a scheme, `://` and everything up to the next white space.
const URL_IN_TEXT = /\b[a-z][a-z0-9+.-]*:\/\/\S*/gi;
// `?password=…` or `&sslpassword=…`; the value ends where the next parameter or the fragment
// starts.
const SECRET_QUERY_PARAMETER = new RegExp(`([?&;]${SECRET_NAME}=)[^&#\\s]*`, 'gi');
// libpq's key/value form, `host=db password='a b' dbname=auth`, and `PGPASSWORD=…` in an
// environment listing: a value is single-quoted (with backslash escapes), double-quoted, or runs
// to the next white space. Only where a key can start, so that a URL's parameters, handled
// above, are not read twice.
const SECRET_KEY_VALUE = new RegExp(
  String.raw`(?<![^\s"'(\[{,])(${SECRET_NAME}\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|\S*)`,
  'gi',
);

/**
 * The URL with its password masked: the one in the user part and any secret query parameter.
 * A URL that parses is first written out by the parser, which percent-encodes what a user may
 * have typed raw (a space in the password), so that the mask covers all of it.
 */
export function redactUrl(url: string): string {
  let parsed: URL;
  try {
    parsed = new URL(url);
  } catch {
    return redactText(url);
  }
  if (parsed.password !== '') parsed.password = MASK;
  return redactText(parsed.href);
}

/** `text` with every password in a URL, a URL parameter or a `key=value` pair masked. */
export function redactText(text: string): string {
  return text.replace(URL_IN_TEXT, redactUrlInText).replace(SECRET_KEY_VALUE, `$1${MASK}`);
}

/** A copy of `value` with passwords in its strings masked and secret-named fields dropped. */
export function redactSecrets(value: unknown, depth = 0): unknown {
  if (typeof value === 'string') return redactText(value);
  if (value === null || typeof value !== 'object' || depth > 8) return value;
  // Copied member by member below, a Date would become {}.
  if (value instanceof Date) return value.toISOString();
  if (Array.isArray(value)) return value.map((item) => redactSecrets(item, depth + 1));
  const copy: Record<string, unknown> = {};
  for (const [key, member] of Object.entries(value)) {
    copy[key] = SECRET_KEY.test(key) ? '[redacted]' : redactSecrets(member, depth + 1);
  }
  return copy;
}

function redactUrlInText(url: string): string {
  const withoutPassword = maskUserinfoPassword(url);
  const queryStart = withoutPassword.indexOf('?');
  return queryStart === -1
    ? withoutPassword
    : withoutPassword.slice(0, queryStart) +
        withoutPassword.slice(queryStart).replace(SECRET_QUERY_PARAMETER, `$1${MASK}`);
}

/**
 * Masks the password in `scheme://user:password@host`. A parser ends the host part at the first
 * `/`, `?` or `#` and takes its last `@` as the end of the user part, which is right for a
 * password that holds a raw `@`. One that holds a raw `/`, `?` or `#` does not parse, but it may
 * still be quoted in an error; so when the host part has a `:` and no `@`, the user part runs to
 * the last `@` of the whole URL. That masks too much (the port, the path) in the rare URL with
 * an `@` in its query and no password, never too little.
 */
function maskUserinfoPassword(url: string): string {
  const authorityStart = url.indexOf('//') + 2;
  const authorityEnd = url.slice(authorityStart).search(/[/?#]/);
  const authority =
    authorityEnd === -1
      ? url.slice(authorityStart)
      : url.slice(authorityStart, authorityStart + authorityEnd);
  const userinfoEnd = authority.includes('@')
    ? authorityStart + authority.lastIndexOf('@')
    : authority.includes(':')
      ? url.lastIndexOf('@')
      : -1;
  if (userinfoEnd < authorityStart) return url;
  const passwordStart = url.indexOf(':', authorityStart);
  if (passwordStart === -1 || passwordStart > userinfoEnd) return url;
  return `${url.slice(0, passwordStart + 1)}${MASK}${url.slice(userinfoEnd)}`;
}
