#!/usr/bin/env -S node --max-semi-space-size=1
// --max-semi-space-size=1: V8's young generation would otherwise grow to 16 MB per
// semi-space under a stream of notifications; with 1 MB the daemon's peak RSS measured 78 MB
// instead of 124 MB, at no cost in throughput for work this size. (node dist/main.js needs
// the flag in NODE_OPTIONS to get the same.)
import { main } from './cli.js';

await main(process.argv.slice(2));
