/**
 * Remote layers of dedup images against the real kernel: real registry,
 * real EROFS mounts (the cases: helpers/remote-suite.ts).
 */
import { remoteLayerSuite, runsOfTest } from './helpers/remote-suite';

remoteLayerSuite('real');
runsOfTest();
