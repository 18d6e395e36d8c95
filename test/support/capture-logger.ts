// A real winston logger (the production factory) whose JSON lines are parsed back into
// objects, so in-process tests assert on exactly what an operator would see on stdout.
import { Writable } from 'node:stream';
import { createLogger, type Logger } from '../../src/logger.js';

export interface CapturedLine {
  event: string;
  level: string;
  message: string;
  [field: string]: unknown;
}

export interface CapturingLogger {
  logger: Logger;
  lines: CapturedLine[];
  events(name: string): CapturedLine[];
  /** Every line as raw text, for asserting that a secret never appears anywhere. */
  text(): string;
}

export function createCapturingLogger(level: 'info' | 'debug' = 'debug'): CapturingLogger {
  const lines: CapturedLine[] = [];
  const raw: string[] = [];
  const stream = new Writable({
    write(chunk: Buffer, _encoding, done) {
      for (const line of chunk.toString('utf8').split('\n')) {
        if (line.trim() === '') continue;
        raw.push(line);
        lines.push(JSON.parse(line) as CapturedLine);
      }
      done();
    },
  });
  return {
    logger: createLogger({ level, stream }),
    lines,
    events: (name) => lines.filter((line) => line.event === name),
    text: () => raw.join('\n'),
  };
}
