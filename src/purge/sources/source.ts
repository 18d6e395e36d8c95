// Where the prompt purge learns of revocations (PURGE_SOURCE). Every source hands them to the
// same purgers (../purger.ts), which hold the one copy of the delete:
// - notify: the revoke trigger's NOTIFY, received by LISTEN (notify.ts);
// - wal: the token tables' changes, decoded from a logical replication slot (wal.ts);
// - poll: no event at all; the catch-up query on a timer (poll.ts).
import type { PurgeSourceName } from '../../config.js';

export interface PurgeSource {
  readonly name: PurgeSourceName;
  /** Starts receiving; rejects if the first connection fails. */
  start(): Promise<void>;
  /** Stops receiving; nothing reaches the purgers after it resolves. */
  stop(): Promise<void>;
  /**
   * True while revocations reach the purgers, or while this daemon stands by for another one
   * that consumes the slot (a replica's normal state). /readyz reports `listener_disconnected`
   * otherwise.
   */
  readonly connected: boolean;
  /** True while the last attempt found a standby: the daemon waits for a primary. */
  readonly standby: boolean;
  /** How long the source has been disconnected; 0 while connected. /healthz reads it. */
  downForMs(): number;
}
