// The CPU token-reaper used during a measurement: its own process, and its sessions on the
// server (the pool's connections, the LISTEN session, and for `wal` the walsender that decodes
// every change of the database). When the server and the auth service share a few cores, as
// on the benchmark's machine, that CPU is what their commits lose, so it explains a ratio.
//
// Read from /proc, so only for a server on this machine (the embedded one); null elsewhere.
// A session that starts and ends within the window is missed, so the sessions' figure is a
// floor.
import { readFile } from 'node:fs/promises';

import type { BenchDatabase } from './databases.js';

/** Linux's USER_HZ, the unit of utime and stime in /proc/<pid>/stat, on every mainstream port. */
const TICKS_PER_SECOND = 100;

export interface CpuUse {
  /** The daemon process, user + system. */
  readonly daemonSeconds: number | null;
  /** Its server sessions (backends and walsender), user + system. */
  readonly sessionsSeconds: number | null;
}

export interface CpuWindow {
  finish(): Promise<CpuUse>;
}

/** `serverIsLocal`: the server's processes are this machine's, so /proc shows its sessions. */
export async function openCpuWindow(
  database: BenchDatabase,
  daemonPid: number | undefined,
  serverIsLocal: boolean,
): Promise<CpuWindow> {
  const sessions = () => (serverIsLocal ? readSessions(database) : new Map<number, number>());
  const daemonAtStart = daemonPid === undefined ? null : await readCpuSeconds(daemonPid);
  const sessionsAtStart = await sessions();
  return {
    async finish() {
      const daemonAtEnd = daemonPid === undefined ? null : await readCpuSeconds(daemonPid);
      const sessionsAtEnd = await sessions();
      let sessionsSeconds: number | null = null;
      for (const [pid, seconds] of sessionsAtEnd) {
        sessionsSeconds = (sessionsSeconds ?? 0) + seconds - (sessionsAtStart.get(pid) ?? 0);
      }
      return {
        daemonSeconds:
          daemonAtStart === null || daemonAtEnd === null ? null : daemonAtEnd - daemonAtStart,
        sessionsSeconds,
      };
    },
  };
}

/** CPU seconds of each of token-reaper's sessions on the database that /proc can show. */
async function readSessions(database: BenchDatabase): Promise<Map<number, number>> {
  const sessions = await database.query<{ pid: number }>(
    `SELECT pid FROM pg_stat_activity
     WHERE datname = current_database()
       AND (backend_type = 'walsender'
            OR (application_name LIKE 'token-reaper%'
                AND application_name NOT LIKE 'token-reaper-bench%'))`,
  );
  const seconds = new Map<number, number>();
  for (const { pid } of sessions) {
    const used = await readCpuSeconds(pid);
    if (used !== null) seconds.set(pid, used);
  }
  return seconds;
}

/** utime + stime of a process, in seconds, or null when /proc cannot show it. */
async function readCpuSeconds(pid: number): Promise<number | null> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // The command name, in parentheses, may hold spaces; the fields after it are fixed: state
    // first, then utime and stime as the 12th and 13th (fields 14 and 15 of proc(5)).
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(fields[11]) + Number(fields[12])) / TICKS_PER_SECOND;
  } catch {
    return null;
  }
}
