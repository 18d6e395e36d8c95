// Prometheus metrics and health probes, end to end: a spawned `token-reaper start` with
// METRICS_PORT set, scraped over HTTP the way Prometheus and Kubernetes do, while the test
// makes the real faults happen (a killed listener backend, a sweep that fails).
import { createServer, type AddressInfo } from 'node:net';
import { expect } from 'chai';
import pg from 'pg';
import { createMetrics, createReaper, startMetricsServer } from '../src/index.js';
import { SWEEP_LOCK } from '../src/sweep/sweeper.js';
import { createCapturingLogger } from './support/capture-logger.js';
import { runCli, spawnDaemon, waitFor, type ProcessHandle } from './support/cli.js';
import { useTestDatabase, withServerClient } from './support/database.js';
import { createReferenceSchema } from './support/fixtures.js';

const TABLE = 'public.refresh_tokens';

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** The Prometheus text exposition format, sample lines only (comments and blanks skipped). */
function parseExposition(text: string): Sample[] {
  const samples: Sample[] = [];
  for (const line of text.split('\n')) {
    if (line.trim() === '' || line.startsWith('#')) continue;
    const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+-?\d+)?$/.exec(line);
    if (!match) throw new Error(`not a sample line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    for (const [, name, value] of (match[2] ?? '').matchAll(
      /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g,
    )) {
      labels[name!] = value!.replace(/\\(.)/g, (_, escaped: string) =>
        escaped === 'n' ? '\n' : escaped,
      );
    }
    const raw = match[3]!;
    const value = raw === '+Inf' ? Infinity : raw === '-Inf' ? -Infinity : Number(raw);
    samples.push({ name: match[1]!, labels, value });
  }
  return samples;
}

/** The value of the sample with exactly these labels, or undefined when there is none. */
function valueOf(samples: Sample[], name: string, labels: Record<string, string> = {}) {
  const wanted = Object.entries(labels);
  return samples.find(
    (sample) =>
      sample.name === name &&
      Object.keys(sample.labels).length === wanted.length &&
      wanted.every(([key, value]) => sample.labels[key] === value),
  )?.value;
}

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  await new Promise<void>((resolve, reject) =>
    server.close((error) => (error ? reject(error) : resolve())),
  );
  return port;
}

describe('metrics and health probes', function () {
  this.timeout(60_000);
  const database = useTestDatabase('metrics');
  let daemon: ProcessHandle;
  let port: number;

  const get = async (path: string, init?: RequestInit) => {
    const response = await fetch(`http://127.0.0.1:${port}${path}`, init);
    return {
      status: response.status,
      contentType: response.headers.get('content-type'),
      body: await response.text(),
    };
  };
  const scrape = async () => {
    const response = await get('/metrics');
    expect(response.status, response.body).to.equal(200);
    return parseExposition(response.body);
  };
  const readyz = async () => {
    const response = await get('/readyz');
    return {
      status: response.status,
      body: JSON.parse(response.body) as { status: string; reasons?: string[] },
    };
  };
  const waitForReadiness = (status: 200 | 503, timeoutMs?: number) =>
    waitFor(async () => ((await readyz()).status === status ? readyz() : false), {
      ...(timeoutMs === undefined ? {} : { timeoutMs }),
      message: `/readyz to answer ${status}`,
    });
  const sweepNow = async (event: 'sweep.finished' | 'sweep.failed' | 'sweep.skipped') => {
    const since = daemon.logs.length;
    daemon.signal('SIGUSR1');
    return daemon
      .waitForLog(
        (line) => ['sweep.finished', 'sweep.failed', 'sweep.skipped'].includes(line.event),
        undefined,
        since,
      )
      .then((line) => {
        expect(line.event, daemon.describeOutput()).to.equal(event);
        return line;
      });
  };

  before(async () => {
    await createReferenceSchema(database.current, { passwordResetsTable: null });
    const install = await runCli(['install'], {
      DATABASE_URL: database.url,
      PASSWORD_RESETS_TABLE: 'none',
    });
    expect(install.code, install.stderr + install.stdout).to.equal(0);
  });
  beforeEach(async () => {
    port = await freePort();
    daemon = spawnDaemon(['start'], {
      DATABASE_URL: database.url,
      PASSWORD_RESETS_TABLE: 'none',
      METRICS_PORT: String(port),
      METRICS_HOST: '127.0.0.1',
    });
    // After the first catch-up: a revocation made while it runs may go by either path, and
    // the tests that count purges must know which.
    await daemon.waitForLog('listener.caught_up');
  });
  afterEach(async () => {
    if (daemon.signal('SIGTERM')) {
      expect(await daemon.exited, daemon.describeOutput()).to.deep.equal({
        code: 0,
        signal: null,
      });
    }
  });

  it('counts a purge and a sweep in the metrics, with the latency, the listener and the last sweep', async () => {
    const [revoked] = (
      await database.query<{ id: string }>(
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
         VALUES (gen_random_uuid(), md5(random()::text), now() + interval '1 day') RETURNING id`,
      )
    ).map((row) => row.id);
    await database.query('UPDATE refresh_tokens SET revoked = true WHERE id = $1', [revoked]);
    await daemon.waitForLog((line) => line.event === 'purge.batch' && line.deleted === 1);
    await database.query(
      `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
       SELECT gen_random_uuid(), md5(random()::text || i), now() - interval '1 hour'
       FROM generate_series(1, 4) i`,
    );
    await sweepNow('sweep.finished');

    const samples = await waitFor(
      async () => {
        const scraped = await scrape();
        const swept = valueOf(scraped, 'token_reaper_sweeps_total', {
          trigger: 'signal',
          status: 'finished',
        });
        return swept === 1 ? scraped : false;
      },
      { message: 'the finished sweep in the metrics' },
    );
    const deleted = (path: string) =>
      valueOf(samples, 'token_reaper_rows_deleted_total', { table: TABLE, path });
    expect(deleted('purge')).to.equal(1);
    expect(deleted('sweep')).to.equal(4);
    expect(deleted('catch_up')).to.equal(0);
    expect(valueOf(samples, 'token_reaper_purge_latency_seconds_count')).to.be.at.least(1);
    expect(
      valueOf(samples, 'token_reaper_purge_latency_seconds_bucket', { le: '+Inf' }),
    ).to.be.at.least(1);
    expect(
      valueOf(samples, 'token_reaper_sweep_duration_seconds_count', { trigger: 'signal' }),
    ).to.equal(1);
    expect(valueOf(samples, 'token_reaper_listener_connected')).to.equal(1);
    expect(valueOf(samples, 'token_reaper_last_successful_sweep_timestamp_seconds')).to.be.closeTo(
      Date.now() / 1000,
      30,
    );
    expect(valueOf(samples, 'token_reaper_catch_ups_total', { status: 'finished' })).to.equal(1);
    expect(samples.some((sample) => sample.name === 'token_reaper_build_info')).to.equal(true);
    // prom-client's default metrics, under their standard names.
    expect(valueOf(samples, 'process_start_time_seconds')).to.be.a('number');
    expect(samples.some((sample) => sample.name === 'nodejs_eventloop_lag_seconds')).to.equal(true);
  });

  it('turns unready while the listener is disconnected, and ready again once it reconnects', async () => {
    await waitForReadiness(200);
    const quoted = pg.escapeIdentifier(database.name);
    try {
      // Reconnection is blocked first, so the unready window lasts until the test ends it
      // instead of the ~300 ms of a reconnect.
      await withServerClient(async (client) => {
        await client.query(`ALTER DATABASE ${quoted} ALLOW_CONNECTIONS false`);
        const terminated = await client.query(
          `SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity
           WHERE datname = $1 AND application_name = 'token-reaper-listener'`,
          [database.name],
        );
        expect(terminated.rows).to.deep.equal([{ done: true }]);
      });
      const unready = await waitForReadiness(503);
      expect(unready.body).to.include({ status: 'unready' });
      expect(unready.body.reasons).to.include('listener_disconnected');
      expect(valueOf(await scrape(), 'token_reaper_listener_connected')).to.equal(0);
    } finally {
      await withServerClient((client) =>
        client.query(`ALTER DATABASE ${quoted} ALLOW_CONNECTIONS true`),
      );
    }
    const ready = await waitForReadiness(200, 30_000);
    expect(ready.body).to.deep.equal({ status: 'ready' });
    const samples = await scrape();
    expect(valueOf(samples, 'token_reaper_listener_connected')).to.equal(1);
    expect(valueOf(samples, 'token_reaper_listener_reconnects_total')).to.equal(1);
  });

  it('turns unready after a failed sweep, and ready again after a successful one', async () => {
    await waitForReadiness(200);
    await database.query('ALTER TABLE refresh_tokens RENAME TO refresh_tokens_elsewhere');
    try {
      await sweepNow('sweep.failed');
      const unready = await waitForReadiness(503);
      expect(unready.body).to.include({ status: 'unready' });
      expect(unready.body.reasons).to.include('last_sweep_failed');
    } finally {
      await database.query('ALTER TABLE refresh_tokens_elsewhere RENAME TO refresh_tokens');
    }
    await sweepNow('sweep.finished');
    await waitForReadiness(200);
    const samples = await scrape();
    for (const status of ['failed', 'finished']) {
      expect(
        valueOf(samples, 'token_reaper_sweeps_total', { trigger: 'signal', status }),
        status,
      ).to.equal(1);
    }
  });

  it('stays ready when a sweep is skipped because another process holds the sweep lock', async () => {
    await waitForReadiness(200);
    const holder = await database.pool.connect();
    try {
      const locked = await holder.query<{ locked: boolean }>(
        'SELECT pg_try_advisory_lock($1, $2) AS locked',
        [SWEEP_LOCK.classId, SWEEP_LOCK.objectId],
      );
      expect(locked.rows).to.deep.equal([{ locked: true }]);
      await sweepNow('sweep.skipped');
      await waitFor(
        async () =>
          valueOf(await scrape(), 'token_reaper_sweeps_total', {
            trigger: 'signal',
            status: 'skipped',
          }) === 1,
        { message: 'the skipped sweep in the metrics' },
      );
      expect(await readyz()).to.deep.equal({ status: 200, body: { status: 'ready' } });
    } finally {
      await holder.query('SELECT pg_advisory_unlock_all()');
      holder.release();
    }
  });

  it('answers /healthz, serves the text format, and 404s anything else', async () => {
    const listening = daemon.logs.filter((line) => line.event === 'metrics.listening');
    expect(listening).to.have.length(1);
    expect(listening[0]).to.include({ host: '127.0.0.1', port });
    // Listening before the daemon starts, so /healthz answers during startup.
    const started = daemon.logs.findIndex((line) => line.event === 'daemon.started');
    expect(daemon.logs.indexOf(listening[0]!)).to.be.below(started);

    const health = await get('/healthz');
    expect(health.status).to.equal(200);
    expect(JSON.parse(health.body)).to.deep.equal({ status: 'ok' });
    const metrics = await get('/metrics?name=ignored');
    expect(metrics.status).to.equal(200);
    expect(metrics.contentType).to.match(/^text\/plain; version=0\.0\.4/);
    expect((await get('/')).status).to.equal(404);
    expect((await get('/metricsx')).status).to.equal(404);
    expect((await get('/metrics', { method: 'POST' })).status).to.equal(405);
  });
});

describe('metrics for the library API', function () {
  this.timeout(60_000);
  const database = useTestDatabase('metrics_library');

  it('serves a createReaper’s metrics from the events alone, in-process, without a logger', async () => {
    await createReferenceSchema(database.current, { passwordResetsTable: null });
    const settings = { DATABASE_URL: database.url, PASSWORD_RESETS_TABLE: 'none' };
    // Without the trigger it would be unready: revocations would wait for the sweep.
    const install = await runCli(['install'], settings);
    expect(install.code, install.stderr + install.stdout).to.equal(0);
    const capture = createCapturingLogger('info');
    const reaper = await createReaper({
      settings: { ...settings, NODE_ENV: 'test' },
      logger: capture.logger,
    });
    // Made before start(), so the listener's state can be followed from its events.
    const metrics = createMetrics(reaper.events, {
      readiness: () => reaper.readiness(),
      defaultMetrics: false,
    });
    const server = await startMetricsServer({ metrics, port: 0, host: '127.0.0.1' });
    const get = async (path: string) => {
      const response = await fetch(`http://127.0.0.1:${server.port}${path}`);
      return { status: response.status, body: await response.text() };
    };
    try {
      expect(JSON.parse((await get('/readyz')).body)).to.deep.equal({
        status: 'unready',
        reasons: ['listener_disconnected'],
        problems: [],
      });
      await reaper.start();
      expect(await get('/readyz')).to.deep.include({ status: 200 });
      await database.query(
        `INSERT INTO refresh_tokens (user_id, token_hash, expires_at)
         SELECT gen_random_uuid(), md5(random()::text || i), now() - interval '1 hour'
         FROM generate_series(1, 3) i`,
      );
      expect(await reaper.sweep()).to.include({ status: 'finished', deleted: 3 });
      const samples = parseExposition((await get('/metrics')).body);
      expect(valueOf(samples, 'token_reaper_listener_connected')).to.equal(1);
      expect(
        valueOf(samples, 'token_reaper_sweeps_total', { trigger: 'api', status: 'finished' }),
      ).to.equal(1);
      expect(
        valueOf(samples, 'token_reaper_rows_deleted_total', { table: TABLE, path: 'sweep' }),
      ).to.equal(3);
      expect(samples.some((sample) => sample.name.startsWith('process_'))).to.equal(false);
      await reaper.stop();
      expect((await get('/readyz')).status).to.equal(503);
    } finally {
      await reaper.stop();
      metrics.close();
      await server.close();
    }
  });
});
