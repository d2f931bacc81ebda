/**
 * A TCP rendezvous for sharing one small blob (the 128-byte NCCL unique id) from rank 0 with every
 * other rank, for launchers without MPI: rank 0 listens on MASTER_ADDR:MASTER_PORT; the others
 * connect (retrying until rank 0 is up) and say who they are: rank, world size and job id. Rank 0
 * answers once every rank 1..size-1 has checked in, so an error found on the way (a world size that
 * differs, a rank out of range or claimed twice, the deadline) reaches every party waiting, not
 * just rank 0. A party of another job (another job id on the same port) is refused and told why;
 * rank 0 keeps serving its own job. Every wait (connect, read, write, the ranks to arrive) is under
 * one deadline: `timeoutMs` (0 = none), after which a TimeoutError names who was not heard from.
 *
 * Wire format: party → rank 0: 'MOE2' + u32 rank + u32 size + u32 job id length + job id (UTF-8);
 * rank 0 → party: 'MOE2' + u8 status (0: the blob; 1: an error; 2: rank 0 timed out) + u32 length +
 * the blob or the error's message.
 */
import { createConnection, createServer, type Socket } from 'node:net';

import { invalidArgument, InvalidArgumentError, TimeoutError } from '../errors.js';
import { checkKeys, checkPositiveInt, checkTimeoutMs } from '../validate.js';

export interface RendezvousOptions {
  rank: number;
  size: number;
  /**
   * Rank 0's address. Rank 0 listens on it: '::' listens on every interface, IPv4 and IPv6 (IPv4
   * alone where the host has no IPv6), '0.0.0.0' on every IPv4 one.
   */
  addr: string;
  port: number;
  /** Rank 0: the bytes to share. Ignored on other ranks. */
  blob?: Uint8Array;
  timeoutMs?: number;
  /**
   * This job's id, the same on every rank (init() passes MOE_EP_JOB_ID or the launcher's job id):
   * parties presenting another id are refused. Default '' (jobs then cannot be told apart).
   */
  jobId?: string;
}

const MAGIC = Buffer.from('MOE2');
const MAX_JOB_ID = 256;
const MAX_ANSWER = 1 << 20; // the blob or an error message; more is not a moe-ep rank 0
enum Status {
  Blob = 0,
  Error = 1,
  Timeout = 2,
}

export async function rendezvous(options: RendezvousOptions): Promise<Uint8Array> {
  const op = 'rendezvous';
  checkKeys(options, op, { rank: true, size: true, addr: true, port: true, blob: true, timeoutMs: true, jobId: true });
  const { rank, size, addr, port } = options;
  const timeoutMs = options.timeoutMs ?? 300_000;
  const jobId = options.jobId ?? '';
  checkPositiveInt(size, op, 'size');
  if (!Number.isSafeInteger(rank) || rank < 0 || rank >= size) invalidArgument(op, `'rank' ${rank} is not in [0, ${size})`);
  if (!Number.isSafeInteger(port) || port < 1 || port > 65535)
    invalidArgument(op, `'port' (MASTER_PORT) must be 1..65535; received ${port}`);
  if (typeof addr !== 'string' || addr === '') invalidArgument(op, `'addr' (MASTER_ADDR) must be a host name or address`);
  checkTimeoutMs(timeoutMs, op);
  if (typeof jobId !== 'string' || Buffer.byteLength(jobId) > MAX_JOB_ID)
    invalidArgument(op, `'jobId' must be a string of at most ${MAX_JOB_ID} bytes`);
  if (rank === 0) {
    if (!(options.blob instanceof Uint8Array)) invalidArgument(op, `rank 0 must pass 'blob' (a Uint8Array)`);
    return serve(options.blob, size, addr, port, timeoutMs, jobId);
  }
  return fetchBlob(rank, size, addr, port, timeoutMs, jobId);
}

function answer(socket: Socket, status: Status, payload: Uint8Array): void {
  const head = Buffer.alloc(9);
  MAGIC.copy(head, 0);
  head.writeUInt8(status, 4);
  head.writeUInt32LE(payload.length, 5);
  socket.end(Buffer.concat([head, payload]));
}

const quote = (s: string): string => JSON.stringify(s);
/** host:port, an IPv6 address in brackets. */
const hostPort = (addr: string, port: number): string => (addr.includes(':') ? `[${addr}]:${port}` : `${addr}:${port}`);
/** What to try when the port does not open: another program may hold it (torchrun's store does). */
const PORT_HINT =
  "another program may hold this port (torchrun's own store listens on MASTER_PORT); MOE_EP_MASTER_PORT gives moe-ep a port of its own";

function serve(blob: Uint8Array, size: number, addr: string, port: number, timeoutMs: number, jobId: string): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    if (size === 1) {
      resolve(blob);
      return;
    }
    const where = hostPort(addr, port);
    const waiting = new Map<number, Socket>(); // ranks checked in, waiting for the answer
    const sockets = new Set<Socket>();
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    // Answers every waiting party (and `also`, a party refused on the spot), then stops serving.
    const finish = (err: Error | null, also?: Socket): void => {
      if (done) return;
      done = true;
      if (timer) clearTimeout(timer);
      server.close();
      const told = new Set<Socket>(waiting.values());
      if (also) told.add(also);
      for (const s of told) {
        if (err)
          answer(
            s,
            err instanceof TimeoutError ? Status.Timeout : Status.Error,
            Buffer.from(err.message.replace(/^rendezvous: /, ''), 'utf8'),
          );
        else answer(s, Status.Blob, blob);
      }
      for (const s of sockets) if (!told.has(s)) s.destroy();
      if (err) reject(err);
      else resolve(blob);
    };
    const fail = (message: string, also?: Socket): void => finish(new InvalidArgumentError(`rendezvous: ${message}`, 'rendezvous'), also);
    const server = createServer((socket) => {
      if (done) {
        socket.destroy();
        return;
      }
      sockets.add(socket);
      let buf = Buffer.alloc(0);
      let heard = false;
      socket.on('close', () => {
        sockets.delete(socket);
        for (const [r, s] of waiting) if (s === socket) waiting.delete(r); // it gave up; it may come back
      });
      socket.on('error', () => {});
      socket.on('data', (chunk: Buffer) => {
        if (done || heard) return;
        buf = Buffer.concat([buf, chunk]);
        if (!buf.subarray(0, Math.min(4, buf.length)).equals(MAGIC.subarray(0, Math.min(4, buf.length)))) {
          socket.destroy(); // not a moe-ep rank (a port scanner, an old version): ignore it
          return;
        }
        if (buf.length < 16) return;
        const idLength = buf.readUInt32LE(12);
        if (idLength > MAX_JOB_ID) {
          socket.destroy();
          return;
        }
        if (buf.length < 16 + idLength) return;
        heard = true;
        const peer = buf.readUInt32LE(4);
        const peerSize = buf.readUInt32LE(8);
        const peerJob = buf.toString('utf8', 16, 16 + idLength);
        if (peerJob !== jobId) {
          // Another job on our port: refuse it and keep serving ours.
          answer(
            socket,
            Status.Error,
            Buffer.from(
              `rank 0 at ${where} serves job ${quote(jobId)}, not job ${quote(peerJob)} of rank ${peer}: two jobs share this MASTER_PORT; give each job its own port (the job id comes from MOE_EP_JOB_ID or the launcher)`,
              'utf8',
            ),
          );
          return;
        }
        if (peerSize !== size)
          return fail(
            `rank ${peer} says the world has ${peerSize} ranks but rank 0 (${where}) has ${size}: WORLD_SIZE differs between the ranks`,
            socket,
          );
        if (peer < 1 || peer >= size)
          return fail(
            `a party claims rank ${peer} of ${size}, but rank 0 (${where}) serves ranks 1..${size - 1}: RANK is out of range`,
            socket,
          );
        if (waiting.has(peer))
          return fail(
            `two parties claim rank ${peer} of ${size} at rank 0 (${where}): RANK is set twice, or two jobs share this MASTER_PORT (set MOE_EP_JOB_ID per job)`,
            socket,
          );
        waiting.set(peer, socket);
        if (waiting.size === size - 1) finish(null);
      });
    });
    let host = addr;
    server.on('error', (e: NodeJS.ErrnoException) => {
      // '::' on a host without IPv6: every IPv4 interface instead.
      if (host === '::' && (e.code === 'EAFNOSUPPORT' || e.code === 'EADDRNOTAVAIL')) {
        host = '0.0.0.0';
        server.listen(port, host);
        return;
      }
      fail(`rank 0 cannot listen on ${where}: ${e.message}${e.code === 'EADDRINUSE' ? `: ${PORT_HINT}` : ''}`);
    });
    server.listen(port, host);
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        const missing: number[] = [];
        for (let r = 1; r < size; r++) if (!waiting.has(r)) missing.push(r);
        finish(
          new TimeoutError(
            `rendezvous: timed out after ${timeoutMs} ms on rank 0 (${where}); not heard from rank${missing.length === 1 ? '' : 's'} ${missing.join(', ')}`,
            'rendezvous',
          ),
        );
      }, timeoutMs);
    }
  });
}

function fetchBlob(rank: number, size: number, addr: string, port: number, timeoutMs: number, jobId: string): Promise<Uint8Array> {
  const where = hostPort(addr, port);
  const id = Buffer.from(jobId, 'utf8');
  const hello = Buffer.alloc(16 + id.length);
  MAGIC.copy(hello, 0);
  hello.writeUInt32LE(rank, 4);
  hello.writeUInt32LE(size, 8);
  hello.writeUInt32LE(id.length, 12);
  id.copy(hello, 16);
  return new Promise((resolve, reject) => {
    let settled = false;
    let socket: Socket | null = null;
    let retry: NodeJS.Timeout | undefined;
    let lastError = '';
    const settle = (err: Error | null, value?: Uint8Array): void => {
      if (settled) return;
      settled = true;
      clearTimeout(deadline);
      clearTimeout(retry);
      socket?.destroy();
      if (err) reject(err);
      else resolve(value as Uint8Array);
    };
    // One deadline over everything: connecting, writing, and waiting for rank 0's answer (rank 0
    // answers only once every rank has checked in; something else on the port may never answer).
    const deadline =
      timeoutMs > 0
        ? setTimeout(
            () =>
              settle(
                new TimeoutError(
                  `rendezvous: timed out after ${timeoutMs} ms on rank ${rank}; not heard from rank 0 at ${where} (${lastError || 'no answer'})`,
                  'rendezvous',
                ),
              ),
            timeoutMs,
          )
        : undefined;
    const attempt = (): void => {
      if (settled) return;
      const s = createConnection({ host: addr, port });
      socket = s;
      let buf = Buffer.alloc(0);
      s.on('connect', () => {
        lastError = `connected; no answer yet: rank 0 answers once all ${size} ranks have checked in, or ${PORT_HINT}`;
        s.write(hello);
      });
      s.on('data', (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        const n = Math.min(4, buf.length);
        if (!buf.subarray(0, n).equals(MAGIC.subarray(0, n))) {
          settle(
            new InvalidArgumentError(
              `rendezvous: what answers at ${where} is not a moe-ep rank 0 (is MASTER_PORT another service's port?)`,
              'rendezvous',
            ),
          );
          return;
        }
        if (buf.length < 9) return;
        const status = buf.readUInt8(4);
        const length = buf.readUInt32LE(5);
        if (status > Status.Timeout || length > MAX_ANSWER) {
          settle(new InvalidArgumentError(`rendezvous: what answers at ${where} is not a moe-ep rank 0 of this version`, 'rendezvous'));
          return;
        }
        if (buf.length < 9 + length) return;
        const payload = buf.subarray(9, 9 + length);
        if (status === Status.Blob) settle(null, new Uint8Array(payload));
        else {
          const message = `rendezvous: rank ${rank} of ${size} was refused by rank 0 at ${where}: ${payload.toString('utf8')}`;
          settle(status === Status.Timeout ? new TimeoutError(message, 'rendezvous') : new InvalidArgumentError(message, 'rendezvous'));
        }
      });
      s.on('error', (e) => {
        lastError = e.message;
      });
      s.on('close', () => {
        // Rank 0 not listening yet, or the connection dropped before an answer: try again.
        if (!settled && socket === s) retry = setTimeout(attempt, 100);
      });
    };
    attempt();
  });
}
