import { invalidArgument } from '../errdefs/errors';
import type { Labels } from './types';

/** containerd's limit (labels.Validate): key and value together. */
export const MAX_LABEL_SIZE = 4096;

/** Validates labels the way containerd does; InvalidArgument names the key. */
export function validateLabels(labels: Labels | undefined | null): Labels {
  const out: Labels = {};
  if (!labels) return out;
  for (const [k, v] of Object.entries(labels)) {
    if (k === '') throw invalidArgument('label key must not be empty');
    if (typeof v !== 'string') throw invalidArgument(`label ${JSON.stringify(k)}: value must be a string`);
    const size = Buffer.byteLength(k) + Buffer.byteLength(v);
    if (size > MAX_LABEL_SIZE) {
      throw invalidArgument(
        `label key and value length (${size} bytes) greater than maximum size (${MAX_LABEL_SIZE} bytes), key: ${truncate(k, 64)}`,
      );
    }
    out[k] = v;
  }
  return out;
}

function truncate(s: string, n: number): string {
  return s.length > n ? `${s.slice(0, n)}…` : s;
}
