/**
 * A TCP rendezvous for sharing one small blob (the 128-byte NCCL unique id) from rank 0 with every
 * other rank, for launchers without MPI: rank 0 listens on MASTER_ADDR:MASTER_PORT; the others
 * connect (retrying until rank 0 is up), say who they are, and receive the blob. Rank 0 returns once
 * every other rank has been served; everyone gives up with a TimeoutError after `timeoutMs`.
 *
 * Wire format: client → server: 'MOEP' + u32 rank + u32 size; server → client: u32 length + blob.
 */
import { createConnection, createServer, type Socket } from 'node:net';

import { invalidArgument, TimeoutError, checkKeys } from '../errors.js';

export interface RendezvousOptions {
  rank: number;
  size: number;
  /** Rank 0's address (rank 0 listens on it; '0.0.0.0' listens everywhere). */
  addr: string;
  port: number;
  /** Rank 0: the bytes to share. Ignored on other ranks. */
  blob?: Uint8Array;
  timeoutMs?: number;
}

const MAGIC = Buffer.from('MOEP');

export async function rendezvous(options: RendezvousOptions): Promise<Uint8Array> {
  const op = 'rendezvous';
  checkKeys(options, op, { rank: true, size: true, addr: true, port: true, blob: true, timeoutMs: true });
  const { rank, size, addr, port } = options;
  const timeoutMs = options.timeoutMs ?? 300_000;
  if (!Number.isSafeInteger(size) || size < 1) invalidArgument(op, `'size' must be a positive integer; received ${size}`);
  if (!Number.isSafeInteger(rank) || rank < 0 || rank >= size) invalidArgument(op, `'rank' ${rank} is not in [0, ${size})`);
  if (!Number.isSafeInteger(port) || port < 1 || port > 65535) invalidArgument(op, `'port' (MASTER_PORT) must be 1..65535; received ${port}`);
  if (typeof addr !== 'string' || addr === '') invalidArgument(op, `'addr' (MASTER_ADDR) must be a host name or address`);
  if (rank === 0) {
    if (!(options.blob instanceof Uint8Array)) invalidArgument(op, `rank 0 must pass 'blob' (a Uint8Array)`);
    return serve(options.blob, size, addr, port, timeoutMs);
  }
  return fetchBlob(rank, size, addr, port, timeoutMs);
}

function serve(blob: Uint8Array, size: number, addr: string, port: number, timeoutMs: number): Promise<Uint8Array> {
  return new Promise((resolve, reject) => {
    const served = new Set<number>();
    const sockets = new Set<Socket>();
    const reply = Buffer.alloc(4 + blob.length);
    reply.writeUInt32LE(blob.length, 0);
    Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength).copy(reply, 4);
    let timer: NodeJS.Timeout | undefined;
    const finish = (err?: Error): void => {
      if (timer) clearTimeout(timer);
      server.close();
      for (const s of sockets) s.destroy();
      if (err) reject(err);
      else resolve(blob);
    };
    const server = createServer((socket) => {
      sockets.add(socket);
      let buf = Buffer.alloc(0);
      socket.on('data', (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        if (buf.length < 12) return;
        if (!buf.subarray(0, 4).equals(MAGIC)) {
          socket.destroy();
          return;
        }
        const peer = buf.readUInt32LE(4);
        const peerSize = buf.readUInt32LE(8);
        if (peerSize !== size) {
          finish(new Error(`rendezvous: rank ${peer} says the world has ${peerSize} ranks but rank 0 has ${size}`));
          return;
        }
        socket.end(reply, () => {
          sockets.delete(socket);
          served.add(peer);
          if (served.size >= size - 1) finish();
        });
      });
      socket.on('error', () => sockets.delete(socket));
    });
    server.on('error', (e) => finish(new Error(`rendezvous: rank 0 cannot listen on ${addr}:${port}: ${e.message}`)));
    if (size === 1) {
      resolve(blob);
      return;
    }
    server.listen(port, addr);
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        const missing: number[] = [];
        for (let r = 1; r < size; r++) if (!served.has(r)) missing.push(r);
        finish(new TimeoutError(`rendezvous: timed out after ${timeoutMs} ms on rank 0 (${addr}:${port}); not heard from rank${missing.length === 1 ? '' : 's'} ${missing.join(', ')}`, 'rendezvous'));
      }, timeoutMs);
    }
  });
}

function fetchBlob(rank: number, size: number, addr: string, port: number, timeoutMs: number): Promise<Uint8Array> {
  const deadline = timeoutMs > 0 ? Date.now() + timeoutMs : Infinity;
  return new Promise((resolve, reject) => {
    let lastError = '';
    const attempt = (): void => {
      if (Date.now() > deadline) {
        reject(new TimeoutError(`rendezvous: timed out after ${timeoutMs} ms on rank ${rank}; not heard from rank 0 at ${addr}:${port} (${lastError || 'no answer'})`, 'rendezvous'));
        return;
      }
      const socket = createConnection({ host: addr, port });
      let buf = Buffer.alloc(0);
      let done = false;
      socket.on('connect', () => {
        const hello = Buffer.alloc(12);
        MAGIC.copy(hello, 0);
        hello.writeUInt32LE(rank, 4);
        hello.writeUInt32LE(size, 8);
        socket.write(hello);
      });
      socket.on('data', (chunk: Buffer) => {
        buf = Buffer.concat([buf, chunk]);
        if (buf.length >= 4 && buf.length >= 4 + buf.readUInt32LE(0)) {
          done = true;
          socket.destroy();
          resolve(new Uint8Array(buf.subarray(4, 4 + buf.readUInt32LE(0))));
        }
      });
      socket.on('error', (e) => {
        lastError = e.message;
      });
      socket.on('close', () => {
        if (!done) setTimeout(attempt, 100);  // rank 0 not listening yet, or it dropped us: retry
      });
    };
    attempt();
  });
}
