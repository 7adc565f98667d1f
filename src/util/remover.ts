import path from 'node:path';
import { RequestThread } from './request-thread';

/**
 * One thread that removes trees (see removeAll; the worker is
 * remove-worker.ts), in order. Removing a layer directory is mostly
 * waiting: on a filesystem mounted with `discard`, every freed block run
 * (each directory's, each file whose data reached the disk) is trimmed
 * before unlink or rmdir returns, ~90 µs apiece on a virtio disk, ~0.1 s
 * for a Debian root. On the main thread that wait held up the conversions
 * and containerd's requests.
 */
let remover: RequestThread<string, void> | null = null;

/** Removes tree `p` on the remover thread; the error is the thread's, with its code, errno, syscall and path. */
export function removeOnThread(p: string): Promise<void> {
  remover ??= new RequestThread<string, void>(path.join(__dirname, 'remove-worker.js'), 'remover');
  return remover.request(p);
}
