import type net from 'node:net';

/**
 * Framing of the holder protocol (holder.ts) on a unix stream socket: each
 * frame is a u32 LE length of a JSON header, the header, a u32 LE length of
 * a payload (0 when none) and the payload.
 */
export interface Frame {
  head: Record<string, unknown>;
  data: Buffer;
}

const MAX_HEAD = 1 << 20;
const MAX_DATA = 64 << 20;

export function encodeFrame(head: Record<string, unknown>, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.from(JSON.stringify(head), 'utf8');
  const out = Buffer.alloc(8 + h.length + data.length);
  out.writeUInt32LE(h.length, 0);
  h.copy(out, 4);
  out.writeUInt32LE(data.length, 4 + h.length);
  data.copy(out, 8 + h.length);
  return out;
}

/** Accumulates bytes and yields whole frames; throws on a frame over the limits (the peer is then dropped). */
export class FrameReader {
  private buf: Buffer = Buffer.alloc(0);

  push(chunk: Buffer): Frame[] {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    const out: Frame[] = [];
    for (;;) {
      if (this.buf.length < 4) break;
      const hl = this.buf.readUInt32LE(0);
      if (hl > MAX_HEAD) throw new Error(`frame header of ${hl} bytes is over ${MAX_HEAD}`);
      if (this.buf.length < 8 + hl) break;
      const dl = this.buf.readUInt32LE(4 + hl);
      if (dl > MAX_DATA) throw new Error(`frame payload of ${dl} bytes is over ${MAX_DATA}`);
      if (this.buf.length < 8 + hl + dl) break;
      const head = JSON.parse(this.buf.subarray(4, 4 + hl).toString('utf8')) as Record<string, unknown>;
      const data = Buffer.from(this.buf.subarray(8 + hl, 8 + hl + dl));
      this.buf = this.buf.subarray(8 + hl + dl);
      out.push({ head, data });
    }
    return out;
  }
}

/**
 * Calls `onFrame` for each whole frame arriving on `sock`; a frame over the
 * limits calls `onBad` and drops the connection (both ends of the holder
 * protocol read this way).
 */
export function readFrames(sock: net.Socket, onFrame: (f: Frame) => void, onBad: (err: Error) => void): void {
  const reader = new FrameReader();
  sock.on('data', (chunk: Buffer) => {
    let frames: Frame[];
    try {
      frames = reader.push(chunk);
    } catch (err) {
      onBad(err as Error);
      sock.destroy();
      return;
    }
    for (const f of frames) onFrame(f);
  });
}
