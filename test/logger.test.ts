// What reaches stdout: every line has its event, errors keep their message and SQLSTATE, and
// no secret survives, wherever it was put.
import { expect } from 'chai';
import { serializeError } from '../src/logger.js';
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
});
