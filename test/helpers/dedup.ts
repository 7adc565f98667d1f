/** Dedup images for tests: convert an image already in a registry with the real mkfs.erofs. */
import fs from 'node:fs';
import path from 'node:path';
import { type ImageConvertResult, convertImage } from '../../src/convert/image-convert';
import { type MkfsFeatures, probeMkfs } from '../../src/convert/mkfs';
import type { RegistryClient } from '../../src/remote/registry';

let probe: Promise<MkfsFeatures> | null = null;

/** Converts `src` to `dst` with 64 KiB chunks, working in a fresh directory under `workParent`. */
export function convertForTest(client: RegistryClient, src: string, dst: string, workParent: string, prefetchFiles?: string[]): Promise<ImageConvertResult> {
  probe ??= probeMkfs('mkfs.erofs');
  return convertImage({ client, src, dst, mkfs: () => probe as Promise<MkfsFeatures>, chunkSize: 65536, workDir: fs.mkdtempSync(path.join(workParent, 'convert-')), prefetchFiles, sameOwner: process.getuid?.() === 0 });
}
