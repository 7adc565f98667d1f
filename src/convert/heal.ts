import crypto from 'node:crypto';
import type { ChunkStore } from '../store/chunkstore';
import type { StoreChunkSink } from './chunk-sink';

/**
 * Heals damaged chunks with the bytes a sink just streamed, keeping nothing
 * else: for a layer the node has already (committed, but quarantined because
 * chunks it reads are lost or damaged), read again from its source. Under
 * the store's import lock, every damaged row of a chunk the sink saw is
 * written again at its own address with the sink's bytes (checked against
 * the digest first), made durable, and marked good; the layers on it are
 * then served again (the store's onChunkHealth). The sink's provisional
 * chunks are given back either way. Returns how many chunks were healed.
 */
export async function healFromSink(store: ChunkStore, sink: StoreChunkSink): Promise<number> {
  try {
    await sink.flush();
    return await store.withLock(async () => {
      await store.restoreFile();
      sink.checkStoreFile('the layer was being read: its bytes went to the old file');
      const heal = sink.chunks().flatMap((c) => store.lookupAll(c.digest).filter((r) => r.bad && r.nblocks === c.nblocks));
      if (heal.length === 0) return 0;
      for (const r of heal) store.pin(r.id);
      try {
        for (const h of heal) {
          const mine = sink.written.get(h.digest);
          // The sink wrote the chunk (the store had no good copy), else it found a good one elsewhere.
          let buf: Buffer | null = mine ? await store.read(mine) : null;
          if (!buf) {
            for (const row of store.lookupAll(h.digest)) {
              if (!row.bad && (buf = await store.readChecked(row))) break;
            }
          }
          if (!buf) throw new Error(`chunk sha256:${h.digest}: no good copy to heal it with`);
          const got = crypto.createHash('sha256').update(buf).digest('hex');
          if (got !== h.digest) throw new Error(`chunk ${h.digest}: the bytes read for it hash to ${got}`);
          await store.write(h, buf);
        }
        await store.sync();
        store.markGood(heal.map((h) => h.id));
        return heal.length;
      } finally {
        for (const r of heal) store.unpin(r.id);
      }
    });
  } finally {
    await sink.discard();
  }
}
