/**
 * containerd's snapshotter conformance suite against the fake kernel
 * (helpers/fake-kernel.ts): the whole lifecycle, conversion to EROFS
 * included, without a mount and without root. Part of `npm run test:unit`.
 */
import { conformanceSuite } from './helpers/conformance-suite';

conformanceSuite('fake');
