/** mount(2) and umount2(2): file-backed EROFS mounts need the raw call. */
import { check, libc } from './libc';

type MountFn = (src: string, target: string, fstype: string, flags: number, data: string | null) => number;
type Umount2Fn = (target: string, flags: number) => number;

let fns: { mount: MountFn; umount2: Umount2Fn } | null = null;

function sys() {
  if (!fns) {
    const lib = libc();
    fns = {
      mount: lib.func('int mount(const char *src, const char *target, const char *fstype, unsigned long flags, const char *data)') as unknown as MountFn,
      umount2: lib.func('int umount2(const char *target, int flags)') as unknown as Umount2Fn,
    };
  }
  return fns;
}

export const MS_RDONLY = 0x1;
export const MNT_DETACH = 0x2;

export function mount(source: string, target: string, fstype: string, flags: number, data: string | null): void {
  check('mount', sys().mount(source, target, fstype, flags, data), `-t ${fstype} ${source} ${target}${data ? ` -o ${data}` : ''}`);
}

export function umount2(target: string, flags = 0): void {
  check('umount2', sys().umount2(target, flags), target);
}
