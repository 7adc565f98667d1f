import http from 'node:http';
import type { Stats } from '../api/stats';
import { apiTarget, configuredApiAddress } from './api-address';

const USAGE = `usage: dedup-snapshotter stats [--json] [--address HOST:PORT|SOCKET]

Prints the running daemon's GET /stats as a table (--json: as JSON). The API
address is api.address from CONFIG unless --address is given.
`;

function get(address: string, url: string): Promise<{ status: number; body: string }> {
  const target = apiTarget(address);
  return new Promise((resolve, reject) => {
    const req = http.get({ ...target, path: url, timeout: 10_000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('timeout', () => req.destroy(new Error('no answer within 10 s')));
    req.on('error', reject);
  });
}

const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
function bytes(n: number): string {
  let v = n;
  let u = 0;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${n} B` : `${v.toFixed(1)} ${units[u]}`;
}

const ms = (v: number | null) => (v === null ? '-' : `${v} ms`);

/** The table `stats` prints: sections of label/value rows. */
export function formatStats(s: Stats): string {
  const sections: [string, [string, string][]][] = [
    ['daemon', [['version', s.version], ['uptime', `${s.uptime_seconds} s`], ['pid', String(s.process.pid)], ['memory (RSS)', bytes(s.process.rss_bytes)]]],
    [
      'snapshots',
      [
        ['active / view / committed', `${s.snapshots.active} / ${s.snapshots.view} / ${s.snapshots.committed}`],
        ['layers: EROFS / directory / converting', `${s.layers.erofs} / ${s.layers.directory} / ${s.layers.converting}`],
      ],
    ],
    [
      'dedup',
      [
        ['file data in layers (logical)', bytes(s.bytes.logical)],
        ['stored in the chunk store', bytes(s.bytes.stored)],
        ['saved', bytes(s.bytes.saved)],
        ['dedup ratio', s.dedup_ratio === null ? '-' : `${s.dedup_ratio.toFixed(2)}×`],
        ['chunk references / unique chunks', `${s.chunks.total} / ${s.chunks.unique}`],
        ['chunk store on disk / metadata images', `${bytes(s.bytes.store_disk)} / ${bytes(s.bytes.images)}`],
      ],
    ],
    [
      'conversions (since start)',
      [
        ['done / failed', `${s.conversions.count} / ${s.conversions.failures}`],
        ['converted', bytes(s.conversions.bytes)],
        ['duration last / p50 / p99', `${ms(s.conversions.last_ms)} / ${ms(s.conversions.p50_ms)} / ${ms(s.conversions.p99_ms)}`],
      ],
    ],
    [
      'mounts',
      [
        ['backend', s.mounts.backend ?? '-'],
        ['EROFS layer mounts', String(s.mounts.erofs_layers)],
        ['direct I/O / read-ahead', `${s.mounts.direct_io ?? '-'} / ${s.mounts.read_ahead_kb === null ? '-' : `${s.mounts.read_ahead_kb} KiB`}`],
      ],
    ],
    [
      'prefetch',
      [
        ['requests / rejected', `${s.prefetch.requests} / ${s.prefetch.rejected}`],
        ['jobs done / failed / queued', `${s.prefetch.jobs_done} / ${s.prefetch.jobs_failed} / ${s.prefetch.queue}`],
        ['files / bytes read', `${s.prefetch.files_read} / ${bytes(s.prefetch.bytes_read)}`],
      ],
    ],
    [
      'on-demand',
      [
        ['backend', s.ondemand.backend ?? '-'],
        ['requests / hits / misses / queue', `${s.ondemand.requests} / ${s.ondemand.hits} / ${s.ondemand.misses} / ${s.ondemand.queue}`],
        ['bytes fetched / errors (EIO)', `${bytes(s.ondemand.bytes)} / ${s.ondemand.errors}`],
        ['lazy layers / incomplete / missing chunks', `${s.ondemand.lazy_layers} / ${s.ondemand.incomplete_layers} / ${s.ondemand.missing_chunks}`],
      ],
    ],
    [
      'KSM',
      s.ksm.counters
        ? [
            ['state', s.ksm.state],
            ['pages shared / sharing', `${s.ksm.counters.pages_shared ?? '-'} / ${s.ksm.counters.pages_sharing ?? '-'}`],
            ['full scans', String(s.ksm.counters.full_scans ?? '-')],
          ]
        : [['state', `${s.ksm.state}${s.ksm.reason ? ` (${s.ksm.reason})` : ''}`]],
    ],
  ];
  if (s.audit) sections.push(['audit log', [['rows written / dropped', `${s.audit.written} / ${s.audit.dropped}`]]]);
  const width = Math.max(...sections.flatMap(([, rows]) => rows.map(([k]) => k.length)));
  const out: string[] = [];
  for (const [title, rows] of sections) {
    out.push(title);
    for (const [k, v] of rows) out.push(`  ${k.padEnd(width)}  ${v}`);
  }
  return `${out.join('\n')}\n`;
}

export async function runStats(argv: string[]): Promise<number> {
  let json = false;
  let address: string | null = null;
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === '--json') json = true;
    else if (argv[i] === '--address' && i + 1 < argv.length) address = argv[++i];
    else if (argv[i] === '--help' || argv[i] === '-h') {
      process.stdout.write(USAGE);
      return 0;
    } else {
      process.stderr.write(`dedup-snapshotter stats: unknown argument ${JSON.stringify(argv[i])}\n${USAGE}`);
      return 2;
    }
  }
  if (address === null) address = configuredApiAddress('stats');
  if (address === null) return 2;
  let res;
  try {
    res = await get(address, '/stats');
  } catch (err) {
    process.stderr.write(`dedup-snapshotter stats: cannot reach the API at ${address}: ${(err as Error).message} (is the daemon running? systemctl status dedup-snapshotter)\n`);
    return 1;
  }
  if (res.status !== 200) {
    process.stderr.write(`dedup-snapshotter stats: GET /stats at ${address} answered ${res.status}: ${res.body.trim()}\n`);
    return 1;
  }
  if (json) process.stdout.write(res.body.endsWith('\n') ? res.body : `${res.body}\n`);
  else process.stdout.write(formatStats(JSON.parse(res.body) as Stats));
  return 0;
}
