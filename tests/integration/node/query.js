// Drives node-postgres through pgproxy and prints what it saw as one JSON line.
// Connection settings come from the standard PG* environment variables.
"use strict";
const { Client } = require("pg");

async function main() {
  const client = new Client();
  await client.connect();
  const out = {};
  const simple = await client.query("select 6 * 7 as answer, 'Fake Name' as name");
  out.simple = simple.rows[0];
  const param = await client.query("select $1::int + 1 as next, $2::text as label", [41, "héllo"]);
  out.param = param.rows[0];
  const named = { name: "pgproxy_prepared", text: "select $1::int * 2 as doubled" };
  out.prepared = [];
  for (const v of [1, 2, 3]) {
    out.prepared.push((await client.query({ ...named, values: [v] })).rows[0].doubled);
  }
  // a raw type parser shows the bytes as they arrived: int4 1094861636 is 41424344 in binary
  // (ASCII "ABCD", which survives pg's string round trip) and "1094861636" in text
  const raw = { getTypeParser: () => (v) => (Buffer.isBuffer(v) ? v.toString("hex") : `text:${v}`) };
  const binaryClient = new Client({ binary: true });
  await binaryClient.connect();
  const binary = await binaryClient.query({ text: "select $1::int4 as n", values: [1094861636], types: raw });
  out.binary = binary.rows[0].n;
  await binaryClient.end();
  try {
    await client.query("select * from pgproxy_no_such_table");
    out.error = null;
  } catch (err) {
    out.error = { code: err.code, message: err.message };
  }
  out.after = (await client.query("select 'recovered' as s")).rows[0].s;
  await client.end();
  process.stdout.write(JSON.stringify(out) + "\n");
}

main().catch((err) => {
  process.stderr.write(String(err && err.stack ? err.stack : err) + "\n");
  process.exit(1);
});
