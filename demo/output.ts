// What the demo prints. Plain lines that read the same in a terminal and in a CI log; colour
// only when stdout is a terminal and NO_COLOR is unset (https://no-color.org).
import { styleText } from 'node:util';

type Style = Parameters<typeof styleText>[0];

const useColour = process.stdout.isTTY === true && process.env['NO_COLOR'] === undefined;
const style = (format: Style, text: string): string => (useColour ? styleText(format, text) : text);

const write = (text = ''): void => {
  process.stdout.write(`${text}\n`);
};

export const out = {
  title(text: string): void {
    write(style('bold', text));
  },
  /** The start of a scene: a blank line, then its title. */
  heading(text: string): void {
    write();
    write(style(['bold', 'cyan'], `▸ ${text}`));
  },
  blank(): void {
    write();
  },
  info(text: string): void {
    write(`  ${text}`);
  },
  ok(text: string): void {
    write(`  ${style('green', '✓')} ${text}`);
  },
  /** Commands for the reader to copy, each with a comment, set apart from the prose. */
  commands(commands: readonly (readonly [command: string, comment: string])[]): void {
    const width = Math.max(...commands.map(([command]) => command.length));
    for (const [command, comment] of commands) {
      write(`    ${style('yellow', command.padEnd(width))}  ${style('dim', `# ${comment}`)}`);
    }
  },
  /** A line a child process wrote, verbatim, so the reader sees the real log format. */
  raw(source: string, line: string): void {
    write(style('dim', `  ${source} │ ${line}`));
  },
  /** Right-aligns every column but the first. */
  table(header: readonly string[], rows: readonly (readonly string[])[]): void {
    const widths = header.map((_, column) =>
      Math.max(...[header, ...rows].map((row) => (row[column] ?? '').length)),
    );
    const format = (row: readonly string[]) =>
      row
        .map((cell, column) =>
          column === 0 ? cell.padEnd(widths[column] ?? 0) : cell.padStart(widths[column] ?? 0),
        )
        .join('   ');
    write(`  ${style('bold', format(header))}`);
    for (const row of rows) write(`  ${format(row)}`);
  },
  failure(text: string): void {
    process.stderr.write(`\n${style(['bold', 'red'], '✗')} ${text}\n`);
  },
};

export const count = (value: number): string => value.toLocaleString('en-US');
