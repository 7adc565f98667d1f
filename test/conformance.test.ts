/**
 * containerd's snapshotter conformance suite against the real kernel: root,
 * real bind, overlay and EROFS mounts (the cases: helpers/conformance-suite.ts).
 */
import { conformanceSuite } from './helpers/conformance-suite';

conformanceSuite('real');
