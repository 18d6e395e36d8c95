// What reaches stdout: every line has its event, errors keep their message and SQLSTATE, and
// no secret survives, wherever it was put. With LOG_FORMAT=pretty, short lines for people that
// go through the same redaction; JSON whenever stdout is not a terminal and nothing says pretty.
import { Writable } from 'node:stream';
import { expect } from 'chai';
import { loadConfig } from '../src/config.js';
import type { SweepProgressEvent } from '../src/events.js';
import {
  createHostLogger,
  createLogger,
  DEFAULT_LOG_BUFFER_LIMIT_BYTES,
  serializeError,
  type LoggerOptions,
} from '../src/logger.js';
import { createStatusLine, formatProgressBar, formatSeconds, wantsColors } from '../src/pretty.js';
import { runCli, waitFor } from './support/cli.js';
import { createCapturingLogger } from './support/capture-logger.js';

describe('the logger', () => {
  it('writes timestamp, level, message and event on every line, and component on a child', () => {
    const capture = createCapturingLogger('info');
    capture.logger.child('sweep').info('sweep.started', 'sweep started', { trigger: 'cli' });
    capture.logger.debug('sweep.batch', 'filtered out at info');
    expect(capture.lines).to.have.length(1);
    const [line] = capture.lines;
    expect(line).to.include({
      event: 'sweep.started',
      level: 'info',
      message: 'sweep started',
      component: 'sweep',
      trigger: 'cli',
    });
    expect(Date.parse(line!.timestamp as string)).to.be.greaterThan(0);
  });

  it('masks the password of any database URL, in the message and in every field', () => {
    const capture = createCapturingLogger('info');
    capture.logger.warn(
      'database.unreachable',
      'cannot reach postgres://reaper:hunter2@db:5432/auth',
      {
        url: 'postgresql://reaper:hunter2@db/auth?sslmode=require',
        nested: { urls: ['postgres://u:hunter2@h/d'] },
        error: new Error('connect to postgres://reaper:hunter2@db failed'),
      },
    );
    expect(capture.text()).not.to.include('hunter2');
    expect(capture.lines[0]!.url).to.equal('postgresql://reaper:***@db/auth?sslmode=require');
  });

  it('drops fields named like a token, a token hash or a password, but keeps table names', () => {
    const capture = createCapturingLogger('info');
    capture.logger.info('purge.batch', 'purged', {
      token: 'rt_live_abc',
      token_hash: 'e3b0c442',
      tokenHash: 'e3b0c442',
      password: 'hunter2',
      tables: { 'public.password_resets': { deleted: 3 } },
    });
    expect(capture.text())
      .not.to.include('rt_live_abc')
      .and.not.include('e3b0c442')
      .and.not.include('hunter2');
    expect(capture.lines[0]!.tables).to.deep.equal({ 'public.password_resets': { deleted: 3 } });
  });

  it('serializes an error with its message and the SQLSTATE of its cause', () => {
    const cause = Object.assign(new Error('canceling statement due to statement timeout'), {
      code: '57014',
    });
    const wrapped = new Error('Statement has been cancelled due to a statement_timeout.', {
      cause,
    });
    expect(serializeError(wrapped)).to.deep.equal({
      name: 'Error',
      message:
        'Statement has been cancelled due to a statement_timeout.: canceling statement due to statement timeout',
      code: '57014',
    });
    const capture = createCapturingLogger('info');
    capture.logger.error('sweep.failed', 'failed', { error: wrapped });
    expect(capture.lines[0]!.error).to.deep.equal(serializeError(wrapped));
  });

  it('leaves out the detail of a unique violation, which can hold a token hash', () => {
    const error = Object.assign(new Error('duplicate key value violates unique constraint'), {
      code: '23505',
      detail: 'Key (token_hash)=(e3b0c442) already exists.',
    });
    expect(JSON.stringify(serializeError(error))).not.to.include('e3b0c442');
  });

  describe('with LOG_FORMAT=pretty', () => {
    it('writes the time, the level, the event, the message and the short fields on one line', () => {
      const capture = captureText({ format: 'pretty', colors: false });
      const { logger } = capture;
      logger.child('sweep').info('sweep.finished', 'sweep finished: 1200 rows deleted in 840 ms', {
        trigger: 'cli',
        deleted: 1200,
        skipped: 0,
        durationMs: 840,
        batchDurationMs: { p50: 12, p99: 30 },
        tables: { 'public.refresh_tokens': { deleted: 1200 } },
      });
      logger.warn('listener.reconnecting', 'reconnecting failed, attempt 2', {
        channel: 'refresh_token_revoked',
        attempt: 2,
        downMs: 1500,
        error: serializeError(
          Object.assign(new Error('connect ECONNREFUSED 127.0.0.1:5432'), { code: 'ECONNREFUSED' }),
        ),
      });
      logger.error('sweep.failed', 'sweep failed; the next sweep will try again', {
        trigger: 'schedule',
        dryRun: false,
        nextSweepAt: null,
        error: new Error('boom'),
      });
      logger.info('install.finished', 'install finished: 2 applied, 4 already in place', {
        applied: ['function', 'trigger'],
        unchanged: ['index a', 'index b', 'index c', 'index d'],
        dryRun: true,
      });
      logger.info('daemon.stopped', 'stopped');
      logger.info('listener.connected', 'listening on refresh_token_revoked', {
        channel: 'refresh_token_revoked',
        reconnected: false,
      });
      logger.debug('sweep.batch', 'filtered out at info', { deleted: 3 });

      const lines = capture.lines();
      for (const line of lines) expect(line).to.match(/^\d\d:\d\d:\d\d\.\d{3} /);
      expect(lines.map(withoutTime)).to.deep.equal([
        'INFO  sweep.finished sweep finished: 1200 rows deleted in 840 ms  trigger=cli deleted=1200 skipped=0 durationMs=840',
        'WARN  listener.reconnecting reconnecting failed, attempt 2  channel=refresh_token_revoked attempt=2 downMs=1500 error="connect ECONNREFUSED 127.0.0.1:5432 (ECONNREFUSED)"',
        'ERROR sweep.failed sweep failed; the next sweep will try again  trigger=schedule error=boom',
        'INFO  install.finished install finished: 2 applied, 4 already in place  applied=function,trigger unchanged="index a,index b,index c,…+1" dryRun=true',
        'INFO  daemon.stopped stopped',
        // The channel is in the message; it is not said twice.
        'INFO  listener.connected listening on refresh_token_revoked',
      ]);
    });

    it('shows the time of day in the process’s time zone', () => {
      const capture = captureText({ format: 'pretty', colors: false });
      const before = Date.now();
      capture.logger.info('daemon.ready', 'ready');
      const after = Date.now();
      const [hours, minutes, seconds, milliseconds] = capture
        .lines()[0]!
        .slice(0, 12)
        .split(/[:.]/)
        .map(Number);
      const logged = new Date(before);
      logged.setHours(hours!, minutes!, seconds!, milliseconds!);
      expect(logged.getTime()).to.be.within(before, after);
    });

    it('colours the level, the time, the event and the keys, and nothing else changes', () => {
      const plain = captureText({ format: 'pretty', colors: false });
      const coloured = captureText({ format: 'pretty', colors: true });
      for (const { logger } of [plain, coloured]) {
        logger.info('purge.batch', 'purged 3 of 3 revoked tokens', { table: 'refresh_tokens' });
        logger.warn('purge.queue_full', 'too many revocations queued', { queued: 10_000 });
        logger.error('command.failed', 'sweep failed', { error: new Error('no') });
      }
      const [info, warn, error] = coloured.lines();
      expect(info).to.include('\x1b[32mINFO \x1b[39m').and.include('\x1b[36mpurge.batch\x1b[39m');
      expect(info).to.match(new RegExp(String.raw`^\x1b\[90m\d\d:\d\d:\d\d\.\d{3}\x1b\[39m `));
      expect(info).to.include('\x1b[90mtable=\x1b[39mrefresh_tokens');
      expect(warn).to.include('\x1b[33mWARN \x1b[39m');
      expect(error).to.include('\x1b[31mERROR\x1b[39m');
      const stripped = coloured
        .lines()
        .map((line) => withoutTime(line.replace(new RegExp(String.raw`\x1b\[\d+m`, 'g'), '')));
      expect(stripped).to.deep.equal(plain.lines().map(withoutTime));
      expect(plain.text()).not.to.include('\x1b');
    });

    it('escapes control characters, so a logged value cannot drive the terminal', () => {
      const capture = captureText({ format: 'pretty', colors: false });
      capture.logger.warn('listener.bad_payload', 'ignored a notification: \x1b[2Jcleared\r', {
        problem: 'bad\nline',
        table: 'evil\x1b]0;title\x07',
        note: 'right\u202eleft\u0085',
      });
      const text = capture.text();
      expect(text.trimEnd().split('\n')).to.have.length(1);
      // eslint-disable-next-line no-control-regex -- looking for any control character
      expect(text.trimEnd()).not.to.match(/[\u0000-\u001f\u007f-\u009f\u202e]/);
      expect(withoutTime(text.trimEnd())).to.equal(
        'WARN  listener.bad_payload ignored a notification: \\u001b[2Jcleared\\r  problem="bad\\nline" table="evil\\u001b]0;title\\u0007" note="right\\u202eleft\\u0085"',
      );
    });

    it('masks passwords and drops secret fields, as the JSON lines do', () => {
      const capture = captureText({ format: 'pretty', colors: true });
      capture.logger.warn(
        'database.unreachable',
        'cannot reach postgres://reaper:hunter2@db:5432/auth',
        {
          url: 'postgresql://reaper:hunter2@db/auth?sslmode=require&password=hunter2',
          dsn: "host=db password='hunter2' dbname=auth",
          urls: ['postgres://u:hunter2@h/d'],
          error: new Error('connect to postgres://reaper:hunter2@db failed'),
          token: 'rt_live_abc',
          password: 'hunter2',
        },
      );
      const text = capture.text();
      expect(text).not.to.include('hunter2').and.not.include('rt_live_abc');
      expect(text)
        .to.include('cannot reach postgres://reaper:***@db:5432/auth')
        .and.include('postgresql://reaper:***@db/auth?sslmode=require&password=***')
        .and.include('connect to postgres://reaper:***@db failed');
    });

    it('reports dropped lines in the same format', async () => {
      const stream = stalledStream();
      const logger = createLogger({
        level: 'info',
        stream: stream.writable,
        format: 'pretty',
        bufferLimitBytes: 1,
      });
      for (let index = 0; index < 2_000; index += 1) logger.info('flood.line', `line ${index}`);
      stream.release();
      const report = await waitFor(() =>
        stream
          .text()
          .split('\n')
          .find((line) => line.includes('log.dropped')),
      );
      expect(withoutTime(report)).to.match(
        /^WARN {2}log\.dropped \d+ log lines dropped while the log stream was not draining {2}dropped=\d+$/,
      );
    });
  });

  describe('to a host’s logger (createHostLogger)', () => {
    it('hands each entry at or above the level to the host’s method, short, redacted and without time or level', () => {
      const calls: string[] = [];
      const host = {
        log: (line: string) => calls.push(`log ${line}`),
        warn: (line: string) => calls.push(`warn ${line}`),
        error: (line: string) => calls.push(`error ${line}`),
      };
      const logger = createHostLogger(host, 'info').child('sweeper');
      logger.info('sweep.finished', 'sweep finished', { deleted: 3, token_hash: 'abc123' });
      logger.warn('listener.lost', 'lost postgres://reaper:hunter2@db/auth', {});
      logger.error('purge.failed', 'purge failed', { error: new Error('boom') });
      logger.debug('purge.batch', 'not at info');
      expect(calls).to.deep.equal([
        'log sweep.finished sweep finished  deleted=3 token_hash=[redacted]',
        'warn listener.lost lost postgres://reaper:***@db/auth',
        'error purge.failed purge failed  error=boom',
      ]);
    });

    it('sends debug entries to the host’s debug, or to log when it has none', () => {
      const calls: string[] = [];
      const withDebug = { log: () => undefined, warn: () => undefined, error: () => undefined };
      createHostLogger(
        { ...withDebug, debug: (line: string) => calls.push(`debug ${line}`) },
        'debug',
      ).debug('purge.batch', 'a batch');
      createHostLogger({ ...withDebug, log: (line) => calls.push(`log ${line}`) }, 'debug').debug(
        'purge.batch',
        'a batch',
      );
      expect(calls).to.deep.equal(['debug purge.batch a batch', 'log purge.batch a batch']);
    });
  });

  describe('LOG_FORMAT and colour', () => {
    const minimal = { DATABASE_URL: 'postgres://reaper@db/auth' };

    it('writes JSON unless asked for pretty, and LOG_FORMAT=json asks for JSON on a terminal', () => {
      const unsaid = captureText({});
      unsaid.logger.info('daemon.ready', 'ready', { attempt: 1 });
      const asked = captureText({
        format: loadConfig({ ...minimal, LOG_FORMAT: 'json' }, { terminal: true }).logFormat,
      });
      asked.logger.info('daemon.ready', 'ready', { attempt: 1 });
      for (const capture of [unsaid, asked]) {
        const [line] = capture.lines();
        expect(JSON.parse(line!)).to.include({ event: 'daemon.ready', level: 'info', attempt: 1 });
      }
      const notTerminal = loadConfig(minimal, { terminal: false });
      expect(notTerminal.logFormat).to.equal('json');
    });

    it('colours a terminal, unless NO_COLOR or TERM=dumb; FORCE_COLOR decides first', () => {
      expect(wantsColors(true, {})).to.equal(true);
      expect(wantsColors(false, {})).to.equal(false);
      expect(wantsColors(true, { NO_COLOR: '1' })).to.equal(false);
      expect(wantsColors(true, { NO_COLOR: '' })).to.equal(true);
      expect(wantsColors(true, { TERM: 'dumb' })).to.equal(false);
      expect(wantsColors(false, { FORCE_COLOR: '1' })).to.equal(true);
      expect(wantsColors(false, { FORCE_COLOR: '' })).to.equal(true);
      expect(wantsColors(false, { FORCE_COLOR: '1', NO_COLOR: '1' })).to.equal(true);
      expect(wantsColors(true, { FORCE_COLOR: '0' })).to.equal(false);
      expect(wantsColors(true, { FORCE_COLOR: 'false' })).to.equal(false);
    });
  });

  describe('the progress bar', () => {
    const progress: SweepProgressEvent = {
      table: 'public.refresh_tokens',
      pagesDone: 500,
      pagesTotal: 1000,
      deleted: 42_000,
      rowsPerSecond: 8_400,
      etaSeconds: 65,
      throttled: null,
    };

    it('shows the table, a bar, the pages, the rows, the rate and the time left', () => {
      expect(formatProgressBar(progress)).to.equal(
        'public.refresh_tokens [##########----------]  50% of 1000 pages, 42000 rows, 8400 rows/s, ETA 1m 05s',
      );
      expect(formatProgressBar({ ...progress, pagesDone: 999, etaSeconds: null })).to.equal(
        'public.refresh_tokens [####################]  99% of 1000 pages, 42000 rows, 8400 rows/s',
      );
      expect(formatProgressBar({ ...progress, pagesDone: 0, pagesTotal: 0 })).to.match(
        /\[-{20}\] {3}0% of 0 pages/,
      );
      expect(
        formatProgressBar({
          ...progress,
          throttled: { source: 'standby replica1', lagMs: 3200.4, lagBytes: 1 },
        }),
      ).to.match(/, paused for standby replica1 \(3200 ms behind\)$/);
      expect([5, 65, 3600, 7625].map(formatSeconds)).to.deep.equal([
        '5s',
        '1m 05s',
        '1h 00m',
        '2h 07m',
      ]);
    });

    it('is taken off the terminal for each log line and drawn again below it, in place of the lines it covers', () => {
      const screen: string[] = [];
      const terminal = (name: string, columns: number) =>
        Object.assign(
          new Writable({
            write(chunk: Buffer, _encoding, done) {
              screen.push(`${name}:${chunk.toString('utf8')}`);
              done();
            },
          }),
          { columns },
        );
      const statusLine = createStatusLine(terminal('stderr', 40));
      const logger = createLogger({
        level: 'info',
        stream: terminal('stdout', 40),
        format: 'pretty',
        statusLine,
      });
      logger.info('sweep.started', 'sweep started');
      statusLine.show(formatProgressBar(progress), ['sweep.progress']);
      logger.warn('sweep.positions_missing', 'no positions');
      logger.info('sweep.progress', 'half way');
      statusLine.end();
      logger.info('sweep.progress', 'all the way');
      logger.info('sweep.finished', 'sweep finished');
      const bar = 'public.refresh_tokens [##########-----…';
      expect(bar).to.have.length(39);
      expect(screen.map((write) => write.replace(/\d\d:\d\d:\d\d\.\d{3} /, ''))).to.deep.equal([
        'stdout:INFO  sweep.started sweep started\n',
        `stderr:\r\x1b[K${bar}`,
        'stderr:\r\x1b[K',
        'stdout:WARN  sweep.positions_missing no positions\n',
        `stderr:\r\x1b[K${bar}`,
        // sweep.progress, covered by the bar, is not written while the bar shows.
        'stderr:\r\x1b[K',
        'stdout:INFO  sweep.progress all the way\n',
        'stdout:INFO  sweep.finished sweep finished\n',
      ]);
    });

    it('fits a terminal that does not say its width into 80 columns', () => {
      const written: string[] = [];
      const stream = Object.assign(
        new Writable({
          write(chunk: Buffer, _encoding, done) {
            written.push(chunk.toString('utf8'));
            done();
          },
        }),
        { columns: 0 },
      );
      createStatusLine(stream).show('x'.repeat(200));
      expect(written).to.deep.equal([`\r\x1b[K${'x'.repeat(78)}…`]);
    });
  });

  describe('on the command line', () => {
    const unreachable = { DATABASE_URL: 'postgres://reaper:hunter2@127.0.0.1:1/auth' };

    it('writes JSON lines when stdout is not a terminal', async () => {
      const result = await runCli(['sweep'], unreachable);
      expect(result.code, result.stderr).to.equal(1);
      const failed = result.logs.find((line) => line.event === 'command.failed');
      expect(failed, result.stdout).to.include({ level: 'error', message: 'sweep failed' });
      expect(
        result.stdout
          .trim()
          .split('\n')
          .every((line) => line.startsWith('{')),
      ).to.equal(true);
    });

    it('writes pretty lines for LOG_FORMAT=pretty, coloured only when FORCE_COLOR asks', async () => {
      const plain = await runCli(['sweep'], { ...unreachable, LOG_FORMAT: 'pretty' });
      expect(plain.code, plain.stderr).to.equal(1);
      expect(plain.logs).to.have.length(0);
      expect(plain.stdout).to.match(
        /^\d\d:\d\d:\d\d\.\d{3} ERROR command\.failed sweep failed {2}error="connect ECONNREFUSED 127\.0\.0\.1:1 \(ECONNREFUSED\)"$/m,
      );
      expect(plain.stdout).not.to.include('\x1b');
      const coloured = await runCli(['sweep'], {
        ...unreachable,
        LOG_FORMAT: 'pretty',
        FORCE_COLOR: '1',
      });
      expect(coloured.stdout).to.include('\x1b[31mERROR\x1b[39m \x1b[36mcommand.failed\x1b[39m');
      expect(plain.stdout + plain.stderr + coloured.stdout).not.to.include('hunter2');
    });

    it('exits 2 for a LOG_FORMAT it does not know', async () => {
      const result = await runCli(['sweep'], { ...unreachable, LOG_FORMAT: 'text' });
      expect(result.code).to.equal(2);
      expect(result.stderr).to.include('LOG_FORMAT="text" is not a log format');
    });
  });

  describe('on a stream that does not drain', () => {
    it('drops lines past the bound, holds no more than one line beyond it, and reports the count once the stream drains', async () => {
      const stream = stalledStream();
      const logger = createLogger({ level: 'info', stream: stream.writable });
      const padding = 'p'.repeat(150);
      const lineCount = 10_000;
      const isError = (index: number) => index % 10 === 0;
      let largestBuffer = 0;
      for (let index = 0; index < lineCount; index += 1) {
        const log = isError(index) ? logger.error : logger.info;
        log('flood.line', `line ${index}`, { index, padding });
        // Winston hands a line to the stream before log() returns, so this sees every write.
        largestBuffer = Math.max(largestBuffer, stream.writable.writableLength);
      }

      stream.release();
      const report = await waitFor(() =>
        stream.lines().find((line) => line.event === 'log.dropped'),
      );
      logger.info('after.drain', 'the stream drained');
      await logger.flush();

      // The stream filled up to the bound, and went past it by one line at most.
      expect(largestBuffer).to.be.above(DEFAULT_LOG_BUFFER_LIMIT_BYTES - stream.longestLine());
      expect(largestBuffer).to.be.at.most(DEFAULT_LOG_BUFFER_LIMIT_BYTES + stream.longestLine());
      const lines = stream.lines();
      const written = lines.filter((line) => line.event === 'flood.line');
      // What was written is an unbroken run from the first line; the rest was dropped.
      expect(written.map((line) => line.index)).to.deep.equal(written.map((_, index) => index));
      expect(written.length).to.be.below(lineCount);
      const droppedIndexes = Array.from(
        { length: lineCount - written.length },
        (_, offset) => written.length + offset,
      );
      expect(report).to.include({ level: 'warn', dropped: droppedIndexes.length });
      expect(report.byLevel).to.deep.equal({
        error: droppedIndexes.filter(isError).length,
        info: droppedIndexes.filter((index) => !isError(index)).length,
      });
      // Then logging goes on.
      expect(lines.map((line) => line.event).slice(written.length)).to.deep.equal([
        'log.dropped',
        'after.drain',
      ]);
    });

    it('reports dropped lines whatever the level, even with a bound below the high-water mark', async () => {
      // A bound under the stream's high-water mark would never see a 'drain'; the logger raises
      // it to that mark, so the report still comes. Level error would filter a warn line out.
      const stream = stalledStream();
      const logger = createLogger({ level: 'error', stream: stream.writable, bufferLimitBytes: 1 });
      const lineCount = 1_000;
      let largestBuffer = 0;
      for (let index = 0; index < lineCount; index += 1) {
        logger.error('flood.line', `line ${index}`, { index });
        largestBuffer = Math.max(largestBuffer, stream.writable.writableLength);
      }

      stream.release();
      const report = await waitFor(() =>
        stream.lines().find((line) => line.event === 'log.dropped'),
      );
      expect(largestBuffer).to.be.at.most(
        stream.writable.writableHighWaterMark + stream.longestLine(),
      );
      const written = stream.lines().filter((line) => line.event === 'flood.line').length;
      expect(written).to.be.within(1, lineCount - 1);
      expect(report).to.include({ dropped: lineCount - written });
    });
  });
});

/** A logger writing to memory, with its output as text. */
function captureText(options: Omit<LoggerOptions, 'level' | 'stream'>) {
  const chunks: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      chunks.push(chunk.toString('utf8'));
      done();
    },
  });
  const text = () => chunks.join('');
  return {
    logger: createLogger({ level: 'info', stream, ...options }),
    text,
    lines: () =>
      text()
        .split('\n')
        .filter((line) => line !== ''),
  };
}

/** A pretty line without its leading time of day. */
function withoutTime(line: string) {
  return line.replace(/^\d\d:\d\d:\d\d\.\d{3} /, '');
}

/**
 * A stream whose reader has stalled, as stdout does when it is a pipe that nobody reads: it
 * completes no write until release(), so everything written stays in its buffer.
 */
function stalledStream() {
  const received: string[] = [];
  let held: (() => void) | null = null;
  let stalled = true;
  const writable = new Writable({
    write(chunk: Buffer, _encoding, done) {
      received.push(chunk.toString('utf8'));
      if (stalled) held = done;
      else done();
    },
  });
  const rawLines = () =>
    received
      .join('')
      .split('\n')
      .filter((line) => line !== '');
  return {
    writable,
    text: () => received.join(''),
    lines: () => rawLines().map((line) => JSON.parse(line) as Record<string, unknown>),
    /** Bytes of the longest line received, its newline included. */
    longestLine: () => Math.max(...rawLines().map((line) => Buffer.byteLength(line) + 1)),
    release() {
      stalled = false;
      held?.();
    },
  };
}
