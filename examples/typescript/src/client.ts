/**
 * A client of engram_shm's WebSocket stream: Engram's JSON protocol on
 * /v1/stream (docs/protocol.md, "WebSocket"). It works over any WebSocket
 * with the browser's interface: the browser's own, or npm `ws` in Node.
 *
 * - Backpressure: it sends only up to the `limit` the server grants (acks and
 *   status messages carry it), and backs off on `overloaded`.
 * - Refusals: a retryable refusal (overloaded, no_credit, session_paused...)
 *   consumes no sequence number, so the client resends from the refused
 *   message on, after `retry_after_ms`; a final one (duplicate_id, wrong
 *   dimensions) drops that message's episodes and is reported to `onError`.
 *   A recall refused with `busy` (too many in flight) is asked again after
 *   its `retry_after_ms`.
 * - Resume: when the connection drops it reconnects, sends `init` with
 *   `resume_session_id`, learns the last acked sequence and resends only
 *   what follows: nothing is lost and nothing stored twice.
 */

export interface Episode {
  id: string;
  what?: string;
  when?: string; // RFC 3339
  embedding: number[];
  encoding_confidence?: number;
}

export interface RecallHit {
  id: string;
  similarity: number;
  confidence: number;
  what: string;
  when: string | null;
  generation: number;
}

export interface ServerMessage {
  type: string;
  [field: string]: any;
}

/** The part of the WebSocket interface this client uses (browser and `ws`). */
export interface WebSocketLike {
  readyState: number;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  send(data: string): void;
  close(): void;
}

export interface StreamOptions {
  space?: string;
  batchSize?: number; // episodes per message; 1 sends Engram's single `observation`
  reconnectDelayMs?: number;
  onStatus?: (status: ServerMessage) => void;
  onAck?: (ack: ServerMessage) => void;
  onError?: (error: ServerMessage) => void;
}

const OPEN = 1;
// Refusals after which the same episodes are sent again (with the session
// taken back first for not_session_owner, which the bridge does itself).
const RESEND = new Set(["overloaded", "no_credit", "session_paused", "sequence_gap", "not_session_owner",
  "internal", "shm_full", "storage_full", "storage_error", "engine_closed"]);

interface InFlight {
  seq: number;
  n: number;
  stale: boolean; // sent before a refusal of an earlier message: its answer is ignored
}

export class EngramStream {
  session: string | null = null;
  lastAcked = 0;
  limit = 0;
  state = "active";
  reconnects = 0;
  errors: ServerMessage[] = [];

  private ws: WebSocketLike | null = null;
  private queue: Episode[] = []; // not yet acked; queue[0] is numbered lastAcked + 1
  private sent = 0; // episodes of the queue sent and not refused
  private inflight: InFlight[] = [];
  private notBefore = 0;
  private timer: ReturnType<typeof setTimeout> | null = null;
  private closing = false;
  private waiters: (() => void)[] = [];
  private recalls = new Map<string | number, { hits: RecallHit[]; request: string;
    resolve: (h: RecallHit[]) => void; reject: (e: Error) => void }>();
  private nextRequest = 1;
  private opened: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private readonly space: string;
  private readonly batchSize: number;

  constructor(private readonly url: string, private readonly connect: (url: string) => WebSocketLike,
              private readonly options: StreamOptions = {}) {
    this.space = options.space ?? "default";
    this.batchSize = options.batchSize ?? 1;
  }

  /** Connect and open a session (or resume ours after a reconnect). */
  open(): Promise<void> {
    return new Promise((resolve, reject) => {
      this.opened = { resolve, reject };
      const ws = this.connect(this.url);
      this.ws = ws;
      ws.onopen = () => {
        const init: Record<string, unknown> = { type: "init", memory_space_id: this.space,
          client_buffer_size: 4 * this.batchSize, enable_backpressure: true };
        if (this.session !== null) init.resume_session_id = this.session;
        ws.send(JSON.stringify(init));
      };
      ws.onmessage = (ev) => this.onMessage(JSON.parse(String(ev.data)));
      ws.onerror = () => undefined; // followed by onclose
      ws.onclose = () => this.onClose(ws);
    });
  }

  observe(episode: Episode): void {
    this.queue.push(episode);
    this.pump();
  }

  /** Resolves once every episode given so far is acked. */
  flush(): Promise<number> {
    if (this.queue.length === 0) return Promise.resolve(this.lastAcked);
    return new Promise((resolve) => this.waiters.push(() => resolve(this.lastAcked)));
  }

  recall(cue: number[], k = 10, space = this.space): Promise<RecallHit[]> {
    const requestId = this.nextRequest++;
    return new Promise((resolve, reject) => {
      const request = JSON.stringify({ type: "recall", request_id: requestId, memory_space_id: space, cue, k });
      this.recalls.set(requestId, { hits: [], request, resolve, reject });
      this.ws!.send(request);
    });
  }

  /** Lose the connection as a network fault would (no close message): the
   * client reconnects and resumes. */
  dropConnection(): void {
    this.ws?.close();
  }

  /** Close the session (acknowledged by a `closed` status), then the socket. */
  async close(): Promise<void> {
    await this.flush();
    this.closing = true;
    await new Promise<void>((resolve) => {
      this.closedWaiter = resolve;
      this.ws!.send(JSON.stringify({ type: "close", session_id: this.session, last_sequence: this.lastAcked }));
    });
    this.ws!.close();
  }

  private closedWaiter: (() => void) | null = null;

  private onClose(ws: WebSocketLike): void {
    if (ws !== this.ws || this.closing) return;
    this.reconnects++;
    this.inflight = [];
    this.sent = 0;
    for (const pending of this.recalls.values()) pending.reject(new Error("connection lost during a recall"));
    this.recalls.clear();
    setTimeout(() => {
      this.open().catch(() => undefined); // a failed attempt closes, and retries again
    }, this.options.reconnectDelayMs ?? 100);
  }

  private onMessage(msg: ServerMessage): void {
    switch (msg.type) {
      case "init_ack":
        this.session = msg.session_id;
        this.acked(msg.last_sequence);
        this.limit = msg.limit;
        this.inflight = [];
        this.sent = 0;
        this.opened?.resolve();
        this.opened = null;
        this.pump();
        break;
      case "ack":
        this.answered();
        this.acked(msg.sequence_number);
        this.limit = Math.max(this.limit, msg.limit);
        this.options.onAck?.(msg);
        this.pump();
        break;
      case "status":
        if (msg.state === "closed") {
          this.closedWaiter?.();
          break;
        }
        this.state = msg.state;
        if (msg.limit !== undefined) this.limit = Math.max(this.limit, msg.limit);
        if (msg.retry_after_ms) this.notBefore = Date.now() + msg.retry_after_ms;
        this.options.onStatus?.(msg);
        this.pump();
        break;
      case "recall_result": {
        const pending = this.recalls.get(msg.request_id);
        if (!pending) break;
        pending.hits.push(...msg.results);
        if (!msg.more) {
          this.recalls.delete(msg.request_id);
          pending.resolve(pending.hits);
        }
        break;
      }
      case "error":
        this.onError(msg);
        break;
      default: // heartbeat, durable
        break;
    }
  }

  private onError(msg: ServerMessage): void {
    if (msg.request_id !== undefined && this.recalls.has(msg.request_id)) {
      const pending = this.recalls.get(msg.request_id)!;
      if (msg.code === "busy") { // too many recalls in flight: ask again when told
        setTimeout(() => this.ws?.send(pending.request), msg.retry_after_ms ?? 50);
        return;
      }
      pending.reject(new Error(`${msg.code}: ${msg.message}`));
      this.recalls.delete(msg.request_id);
      return;
    }
    if (msg.sequence_number === undefined) {
      this.opened?.reject(new Error(`${msg.code}: ${msg.message}`));
      this.errors.push(msg);
      this.options.onError?.(msg);
      return;
    }
    const head = this.answered();
    if (head === undefined || head.stale) return;
    if (msg.code === "duplicate_sequence") { // acked before: the server knows more than we did
      this.acked(msg.expected - 1);
      this.pump();
      return;
    }
    if (!RESEND.has(msg.code)) { // refused for good: drop those episodes
      this.errors.push(msg);
      this.options.onError?.(msg);
      const at = head.seq - 1 - this.lastAcked;
      this.queue.splice(at, head.n);
    }
    // Everything sent after the refused message is refused too (a gap): send again from it.
    for (const x of this.inflight) x.stale = true;
    this.sent = Math.max(0, head.seq - 1 - this.lastAcked);
    if (RESEND.has(msg.code)) this.notBefore = Date.now() + (msg.retry_after_ms ?? 20);
    this.pump();
  }

  /** The message a reply answers: replies come in the order of the messages. */
  private answered(): InFlight | undefined {
    return this.inflight.shift();
  }

  private acked(sequence: number): void {
    const done = sequence - this.lastAcked;
    if (done <= 0) return;
    this.queue.splice(0, done);
    this.sent = Math.max(0, this.sent - done);
    this.lastAcked = sequence;
    if (this.queue.length === 0) {
      const waiters = this.waiters;
      this.waiters = [];
      waiters.forEach((w) => w());
    }
  }

  /** Send what the credit allows, in order. */
  private pump(): void {
    const ws = this.ws;
    if (ws === null || ws.readyState !== OPEN || this.session === null || this.opened !== null) return;
    const wait = this.notBefore - Date.now();
    if (wait > 0) {
      if (this.timer === null) {
        this.timer = setTimeout(() => {
          this.timer = null;
          this.pump();
        }, wait);
      }
      return;
    }
    while (this.sent < this.queue.length) {
      const seq = this.lastAcked + this.sent + 1;
      const n = Math.min(this.batchSize, this.queue.length - this.sent, this.limit - seq + 1);
      if (n <= 0) return; // out of credit: an ack or a status brings more
      const episodes = this.queue.slice(this.sent, this.sent + n);
      const msg = n === 1 && this.batchSize === 1
        ? { type: "observation", session_id: this.session, sequence_number: seq, episode: episodes[0] }
        : { type: "observation_batch", session_id: this.session, sequence_number: seq, episodes };
      ws.send(JSON.stringify(msg));
      this.inflight.push({ seq, n, stale: false });
      this.sent += n;
    }
  }
}
