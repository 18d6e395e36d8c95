// Every form in which a connection string can carry a password, masked; everything else left
// readable, because the same messages have to tell an operator what is wrong.
import { expect } from 'chai';
import { redactSecrets, redactText, redactUrl } from '../src/redact.js';

describe('redaction', () => {
  describe('redactUrl', () => {
    const cases: [string, string, string][] = [
      [
        'a password in the user part',
        'postgres://reaper:hunter2@db:5432/auth?sslmode=bogus',
        'postgres://reaper:***@db:5432/auth?sslmode=bogus',
      ],
      [
        'a percent-encoded password',
        'postgresql://reaper:p%40ss%2Fw%3Frd%23x@db/auth',
        'postgresql://reaper:***@db/auth',
      ],
      [
        'a password with a raw @ and a space',
        'postgres://reaper:p@ss w@db/auth',
        'postgres://reaper:***@db/auth',
      ],
      [
        '?password=, keeping the parameters around it',
        'postgres://reaper@db/auth?sslmode=bogus&password=hunter2&application_name=x',
        'postgres://reaper@db/auth?sslmode=bogus&password=***&application_name=x',
      ],
      [
        '?PASSWORD= in capitals',
        'postgres://reaper@db/auth?PASSWORD=hunter2',
        'postgres://reaper@db/auth?PASSWORD=***',
      ],
      [
        '?sslpassword=',
        'postgres://reaper@db/auth?sslmode=require&sslpassword=hunter2',
        'postgres://reaper@db/auth?sslmode=require&sslpassword=***',
      ],
      [
        '?pass= and ?pwd=',
        'postgres://reaper@db/auth?pass=hunter2&pwd=hunter3',
        'postgres://reaper@db/auth?pass=***&pwd=***',
      ],
      [
        'a password that makes the URL unparsable',
        'postgres://reaper:hun/ter#2@db/auth',
        'postgres://reaper:***@db/auth',
      ],
      [
        'a libpq key/value string',
        'host=db password=hunter2 dbname=auth',
        'host=db password=*** dbname=auth',
      ],
      [
        'nothing when there is no password',
        'postgres://reaper@db:5432/auth?sslmode=require',
        'postgres://reaper@db:5432/auth?sslmode=require',
      ],
    ];
    for (const [name, url, expected] of cases) {
      it(`masks ${name}`, () => {
        expect(redactUrl(url)).to.equal(expected);
      });
    }
  });

  describe('redactText', () => {
    const cases: [string, string, string][] = [
      [
        'a URL inside a sentence',
        'cannot connect to postgres://reaper:hunter2@db/auth: refused',
        'cannot connect to postgres://reaper:***@db/auth: refused',
      ],
      [
        'several URLs',
        'from postgres://a:hunter2@x/d to postgresql://b@y/d?password=hunter3',
        'from postgres://a:***@x/d to postgresql://b@y/d?password=***',
      ],
      [
        'a key/value password in single quotes, with a space and an escaped quote',
        "host=db password='hun ter\\'2' dbname=auth",
        'host=db password=*** dbname=auth',
      ],
      [
        'a key/value password with spaces around =',
        'host=db password = hunter2 dbname=auth',
        'host=db password = *** dbname=auth',
      ],
      ['a double-quoted value', 'DB_PASSWORD="hun ter2" PGHOST=db', 'DB_PASSWORD=*** PGHOST=db'],
      ['PGPASSWORD in an environment listing', 'PGPASSWORD=hunter2 psql', 'PGPASSWORD=*** psql'],
      ['sslpassword in a key/value string', 'sslpassword=hunter2', 'sslpassword=***'],
    ];
    for (const [name, text, expected] of cases) {
      it(`masks ${name}`, () => {
        expect(redactText(text)).to.equal(expected);
      });
    }

    it('is idempotent', () => {
      const once = redactText('postgres://a:hunter2@x/d?password=hunter3 password=hunter4');
      expect(redactText(once)).to.equal(once);
    });

    it('leaves alone what only looks like a secret', () => {
      const text =
        'PASSWORD_RESETS_TABLE="tokens;drop" is not a table name; bypass=1; ' +
        'see http://example.com:8080/docs and postgres://reaper@db:5432/auth?sslmode=bogus';
      expect(redactText(text)).to.equal(text);
    });
  });

  describe('redactSecrets', () => {
    it('drops fields named like a password or a token, in any case and with a prefix', () => {
      const names = [
        'password',
        'sslpassword',
        'PGPASSWORD',
        'db_password',
        'dbPassword',
        'passwd',
        'pwd',
        'secret',
        'token',
        'tokenHash',
        'refresh_token',
      ];
      const fields = Object.fromEntries(names.map((name) => [name, 'hunter2']));
      expect(redactSecrets(fields)).to.deep.equal(
        Object.fromEntries(names.map((name) => [name, '[redacted]'])),
      );
    });

    it('keeps fields whose name only contains such a word, and masks URLs in every string', () => {
      expect(
        redactSecrets({
          password_resets: { deleted: 3 },
          passwordResetsTable: 'password_resets',
          tables: ['postgres://reaper:hunter2@db/auth'],
          nested: { error: { message: 'connect to postgres://u@db/auth?password=hunter2' } },
        }),
      ).to.deep.equal({
        password_resets: { deleted: 3 },
        passwordResetsTable: 'password_resets',
        tables: ['postgres://reaper:***@db/auth'],
        nested: { error: { message: 'connect to postgres://u@db/auth?password=***' } },
      });
    });
  });
});
