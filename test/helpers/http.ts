/** HTTP requests to the daemon's API (a unix socket path or host:port) for tests and the benchmark. */
import http from 'node:http';
import path from 'node:path';

export interface Res {
  status: number;
  headers: http.IncomingHttpHeaders;
  body: string;
  json: any;
}

export function request(address: string, method: string, url: string, body?: string | Buffer, headers: Record<string, string> = {}): Promise<Res> {
  const target = path.isAbsolute(address) ? { socketPath: address } : { host: address.split(':')[0], port: Number(address.split(':')[1]) };
  return new Promise((resolve, reject) => {
    const req = http.request({ ...target, method, path: url, headers: { ...(body !== undefined ? { 'content-type': 'application/json' } : {}), ...headers } }, (res) => {
      let data = '';
      res.setEncoding('utf8');
      res.on('data', (d) => (data += d));
      res.on('end', () => {
        let json: any = null;
        try {
          json = JSON.parse(data);
        } catch {
          // not JSON (metrics)
        }
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: data, json });
      });
    });
    req.on('error', reject);
    if (body !== undefined) req.write(body);
    req.end();
  });
}

/** GET /stats of the daemon's API as JSON. */
export async function daemonStats(apiAddress: string): Promise<any> {
  const r = await request(apiAddress, 'GET', '/stats');
  if (r.status !== 200) throw new Error(`GET /stats answered ${r.status}: ${r.body}`);
  return r.json;
}
