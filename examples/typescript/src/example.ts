/**
 * Streams observations to engram_shm over WebSocket with backpressure,
 * drops the connection halfway to show a resume, then recalls every one.
 *
 *   node dist/example.js [ws://127.0.0.1:7432/v1/stream] [count] [dims]
 *
 * Prints one JSON line: what was streamed, acked and found again.
 */
import WebSocket from "ws";

import { EngramStream, type WebSocketLike } from "./client.js";

const url = process.argv[2] ?? "ws://127.0.0.1:7432/v1/stream";
const count = Number(process.argv[3] ?? 5000);
const dims = Number(process.argv[4] ?? 64);
const space = `ts-example-${Date.now()}`;

/** A deterministic vector per observation (mulberry32 draws in [-1, 1)). */
function vector(i: number): number[] {
  let state = (i + 1) * 0x9e3779b9;
  const out = new Array<number>(dims);
  for (let d = 0; d < dims; d++) {
    state = (state + 0x6d2b79f5) | 0;
    let t = Math.imul(state ^ (state >>> 15), 1 | state);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    out[d] = ((t ^ (t >>> 14)) >>> 0) / 2 ** 31 - 1;
  }
  return out;
}

async function main(): Promise<void> {
  const states = new Set<string>();
  const stream = new EngramStream(url, (u) => new WebSocket(u) as unknown as WebSocketLike, {
    space,
    onStatus: (status) => states.add(status.state),
  });
  await stream.open();
  for (let i = 0; i < count; i++) {
    stream.observe({ id: `obs-${i}`, what: `observation ${i}`, embedding: vector(i),
      when: new Date().toISOString(), encoding_confidence: 0.9 });
    if (i === Math.floor(count / 2)) stream.dropConnection(); // resumed without loss or duplicates
    if (i % 500 === 499) await stream.flush(); // keep the producer near what the server accepts
  }
  const acked = await stream.flush();
  let found = 0;
  for (let lo = 0; lo < count; lo += 100) {
    const ids = Array.from({ length: Math.min(100, count - lo) }, (_, j) => lo + j);
    const answers = await Promise.all(ids.map((i) => stream.recall(vector(i), 1)));
    found += answers.filter((hits, j) => hits[0]?.id === `obs-${ids[j]}`).length;
  }
  await stream.close();
  console.log(JSON.stringify({ example: "typescript", space, streamed: count, acked, recalled: found,
    reconnects: stream.reconnects, errors: stream.errors.length, states: [...states] }));
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
