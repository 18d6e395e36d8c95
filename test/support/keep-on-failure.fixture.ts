// Not a test of its own (the name does not end in .test.ts): harness.test.ts runs it in a child
// mocha to check that useTestDatabase keeps a block's database after a failure and drops it
// after success. The failures here are deliberate.

import { useTestDatabase } from './database.js';

describe('a block whose tests all pass', () => {
  const database = useTestDatabase('fixture-passing');
  it('passes', () => {
    console.log(`database passing ${database.name}`);
  });
});

describe('a block with a failing test', () => {
  const database = useTestDatabase('fixture-failing-test');
  it('fails on purpose', () => {
    console.log(`database failing-test ${database.name}`);
    throw new Error('deliberate failure');
  });
  it('passes', () => undefined);
});

describe('a block whose nested before hook fails', () => {
  const database = useTestDatabase('fixture-failing-hook');
  describe('the nested block', () => {
    before(() => {
      console.log(`database failing-hook ${database.name}`);
      throw new Error('deliberate hook failure');
    });
    it('never runs', () => undefined);
  });
});
