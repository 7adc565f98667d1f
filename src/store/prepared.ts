import type Database from 'better-sqlite3';

/** Each database's statements, by their SQL text. */
const statements = new WeakMap<Database.Database, Map<string, Database.Statement>>();

/**
 * `sql` prepared once per database and reused: preparing costs more than
 * running most of these statements, and a conversion runs some of them once
 * per chunk. Only for constant SQL text (the map keeps every text it is
 * given); values always go in as parameters.
 */
export function prepared(db: Database.Database, sql: string): Database.Statement {
  let byText = statements.get(db);
  if (!byText) statements.set(db, (byText = new Map()));
  let s = byText.get(sql);
  if (!s) byText.set(sql, (s = db.prepare(sql)));
  return s;
}
