/** Snapshot kinds, numbered as containerd's Kind enum on the wire. */
export enum Kind {
  Unknown = 0,
  View = 1,
  Active = 2,
  Committed = 3,
}

export function kindName(k: Kind): string {
  switch (k) {
    case Kind.View:
      return 'view';
    case Kind.Active:
      return 'active';
    case Kind.Committed:
      return 'committed';
    default:
      return 'unknown';
  }
}

export type Labels = Record<string, string>;

/** What containerd sees of a snapshot (its `snapshots.Info`). */
export interface Info {
  name: string;
  parent: string;
  kind: Kind;
  labels: Labels;
  /** Milliseconds since the epoch. */
  created: number;
  updated: number;
}

export type { Usage } from '../util/fs';

/** The storage-level view of an active or view snapshot. */
export interface Snapshot {
  /** Numeric id as a decimal string; names the snapshot's directory. */
  id: string;
  kind: Kind;
  /** Ids of the parent chain, nearest first. */
  parentIds: string[];
}

export type { Mount } from '../mount/types';
