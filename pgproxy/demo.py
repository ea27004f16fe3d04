"""``pgproxy demo``: a throwaway Postgres seeded with a synthetic clinic, behind the proxy.

The cluster comes from the Postgres binaries on this machine (``pgproxy.pgcluster``). The data is
generated in SQL from ``generate_series`` so it is deterministic and obviously fake (names from a
short list of placeholders, SSNs in the never-issued 000 area). The proxy runs in this process
with the bundled ``rules/``; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from pgproxy.config import load_settings
from pgproxy.pgcluster import Cluster, ClusterUnavailable

SEED_SQL = """
CREATE TABLE IF NOT EXISTS patients (
  id int PRIMARY KEY, mrn text UNIQUE NOT NULL, first_name text NOT NULL, last_name text NOT NULL,
  ssn text NOT NULL, dob date NOT NULL, phone text, email text, street text, zip text,
  sex text, created_at timestamptz NOT NULL DEFAULT '2024-01-01');
CREATE TABLE IF NOT EXISTS encounters (
  id int PRIMARY KEY, patient_id int NOT NULL REFERENCES patients(id), admitted_at timestamp,
  discharged_at timestamp, department text, diagnosis_code text);
CREATE TABLE IF NOT EXISTS notes (
  id int PRIMARY KEY, encounter_id int NOT NULL REFERENCES encounters(id), body text);
INSERT INTO patients
SELECT i, 'MRN' || lpad(i::text, 7, '0'),
       (ARRAY['Avery','Blake','Casey','Drew','Emerson','Finley','Gray','Harper'])[1 + i % 8],
       (ARRAY['Testperson','Samplesen','Fakeman','Demoski','Placeholder'])[1 + i % 5],
       '000-' || lpad((i % 100)::text, 2, '0') || '-' || lpad((i % 10000)::text, 4, '0'),
       date '1940-01-01' + (i * 37 % 29000),
       '555-01' || lpad((i % 100)::text, 2, '0'),
       'patient' || i || '@example.invalid',
       (i % 900 + 100) || ' Example Street',
       lpad(((i * 7919) % 99999)::text, 5, '0'),
       (ARRAY['F','M','X'])[1 + i % 3], '2024-01-01'::timestamptz + (i || ' minutes')::interval
FROM generate_series(1, {rows}) AS i ON CONFLICT DO NOTHING;
INSERT INTO encounters
SELECT i, 1 + (i % {rows}), timestamp '2023-01-01' + (i || ' hours')::interval,
       timestamp '2023-01-02' + (i || ' hours')::interval,
       (ARRAY['cardiology','oncology','emergency','pediatrics'])[1 + i % 4],
       (ARRAY['I10','E11.9','J45.909','M54.5','F41.1'])[1 + i % 5]
FROM generate_series(1, {rows} * 2) AS i ON CONFLICT DO NOTHING;
INSERT INTO notes
SELECT i, i, 'Seen by Dr. Placeholder. Patient Avery Testperson, MRN' || lpad(i::text, 7, '0')
       || ', call 555-0100 to follow up.'
FROM generate_series(1, {rows}) AS i ON CONFLICT DO NOTHING;
"""


def bundled_rules() -> Path:
    for cand in (Path.cwd() / "rules", Path(__file__).resolve().parent.parent / "rules"):
        if cand.is_dir():
            return cand
    raise FileNotFoundError("the bundled rules/ directory was not found")


async def run_demo(args: argparse.Namespace) -> int:
    from pgproxy.server.runtime import run

    data_dir = Path(args.data_dir or ".pgproxy-demo").resolve()
    if args.fresh and data_dir.exists():
        shutil.rmtree(data_dir)
    rows = args.rows or 1000
    try:
        c = Cluster.open_existing(data_dir) or Cluster.create(data_dir)
    except ClusterUnavailable as exc:
        print(f"pgproxy demo: {exc}. Install PostgreSQL (e.g. apt-get install postgresql).")
        return 1
    c.start()
    try:
        if "clinic" not in c.psql("SELECT datname FROM pg_database").split():
            c.psql("CREATE DATABASE clinic")
        c.psql(SEED_SQL.format(rows=rows), dbname="clinic")
        settings = load_settings(
            {
                "listen": args.listen,
                "http": args.http,
                "upstream": c.dsn(dbname="clinic"),
                "rules": str(bundled_rules()),
                "audit": str(data_dir / "audit.duckdb"),
            },
            environ={},
        )
        host, port = settings.listen_addr

        def ready(_runtime: object) -> None:
            print(
                "\npgproxy demo is running. Connect as an agent:\n"
                f"  psql 'postgresql://triage-bot:s3cret@{host}:{port}/clinic'\n"
                f"Audit: {settings.audit}\n"
                f"Approval pages: {settings.base_url}/\n"
                "Press Ctrl-C to stop.",
                flush=True,
            )

        return await run(settings, ready)
    finally:
        c.stop("fast")
