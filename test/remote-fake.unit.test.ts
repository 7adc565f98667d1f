/**
 * Remote layers of dedup images against the fake kernel
 * (helpers/fake-kernel.ts): real registry, conversion, chunk store,
 * quarantine and repair, without a mount and without root. Part of
 * `npm run test:unit`.
 */
import { remoteLayerSuite } from './helpers/remote-suite';

remoteLayerSuite('fake');
