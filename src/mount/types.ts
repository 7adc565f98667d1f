/** A mount for containerd to perform (containerd.types.Mount). */
export interface Mount {
  type: string;
  source: string;
  target?: string;
  options: string[];
}
