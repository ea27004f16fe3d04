"""The test database fixture itself: a real server that answers."""

import psycopg


def test_pg_dsn_answers(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
