// What reaches stdout: every line has its event, errors keep their message and SQLSTATE, and
// no secret survives, wherever it was put.
import { Writable } from 'node:stream';
import { expect } from 'chai';
import { createLogger, DEFAULT_LOG_BUFFER_LIMIT_BYTES, serializeError } from '../src/logger.js';
import { waitFor } from './support/cli.js';
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
    lines: () => rawLines().map((line) => JSON.parse(line) as Record<string, unknown>),
    /** Bytes of the longest line received, its newline included. */
    longestLine: () => Math.max(...rawLines().map((line) => Buffer.byteLength(line) + 1)),
    release() {
      stalled = false;
      held?.();
    },
  };
}
