// Throwaway certificates for TLS tests, made with the openssl command line: a certificate
// authority, a server certificate it signs for 127.0.0.1 only (no host name), and a second,
// unrelated authority that signed nothing, to stand for the wrong one.

import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** Far enough ahead that a slow run never outlives them, and no further. */
const VALID_DAYS = '2';

export interface TestCertificates {
  /** The directory holding the files below, until dispose(). */
  readonly directory: string;
  /** The authority that signed the server's certificate (a PEM file's path). */
  readonly caFile: string;
  /** An authority that signed nothing here. */
  readonly wrongCaFile: string;
  /** The server's certificate and key, as PEM text, for the server's data directory. */
  readonly serverCertificate: string;
  readonly serverKey: string;
  /** The address the server certificate names, its only subjectAltName. */
  readonly serverAddress: string;
  dispose(): Promise<void>;
}

/** Makes the certificates (EC keys: fast); throws when openssl is missing, saying so. */
export async function createTestCertificates(): Promise<TestCertificates> {
  const directory = await mkdtemp(join(tmpdir(), 'token-reaper-tls-'));
  const path = (name: string) => join(directory, name);
  const serverAddress = '127.0.0.1';
  const newKey = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  const authority = (name: string) =>
    openssl([
      'req',
      '-x509',
      ...newKey,
      '-keyout',
      path(`${name}.key`),
      '-out',
      path(`${name}.crt`),
      '-days',
      VALID_DAYS,
      '-subj',
      `/CN=token-reaper test ${name}`,
      '-addext',
      'basicConstraints=critical,CA:TRUE',
      '-addext',
      'keyUsage=critical,keyCertSign,cRLSign',
    ]);
  try {
    await Promise.all([authority('ca'), authority('wrong-ca')]);
    await openssl([
      'req',
      ...newKey,
      '-keyout',
      path('server.key'),
      '-out',
      path('server.csr'),
      '-subj',
      `/CN=${serverAddress}`,
    ]);
    await writeFile(
      path('server.ext'),
      [
        `subjectAltName=IP:${serverAddress}`,
        'basicConstraints=CA:FALSE',
        'keyUsage=critical,digitalSignature,keyEncipherment',
        'extendedKeyUsage=serverAuth',
      ].join('\n'),
    );
    await openssl([
      'x509',
      '-req',
      '-in',
      path('server.csr'),
      '-CA',
      path('ca.crt'),
      '-CAkey',
      path('ca.key'),
      '-CAcreateserial',
      '-out',
      path('server.crt'),
      '-days',
      VALID_DAYS,
      '-extfile',
      path('server.ext'),
    ]);
    return {
      directory,
      caFile: path('ca.crt'),
      wrongCaFile: path('wrong-ca.crt'),
      serverCertificate: await readFile(path('server.crt'), 'utf8'),
      serverKey: await readFile(path('server.key'), 'utf8'),
      serverAddress,
      dispose: () => rm(directory, { recursive: true, force: true }),
    };
  } catch (error) {
    await rm(directory, { recursive: true, force: true });
    throw error;
  }
}

async function openssl(args: readonly string[]): Promise<void> {
  try {
    await run('openssl', args);
  } catch (error) {
    const { code, stderr } = error as { code?: unknown; stderr?: string };
    throw new Error(
      code === 'ENOENT'
        ? 'openssl is not installed; the TLS tests need it to make their certificates'
        : `openssl ${args[0]} failed: ${stderr ?? String(error)}`,
      { cause: error },
    );
  }
}
