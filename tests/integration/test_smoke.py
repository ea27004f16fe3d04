import psycopg


def test_psycopg_select(running_proxy) -> None:
    with psycopg.connect(running_proxy.dsn()) as conn:
        assert conn.execute("select 1 + 1").fetchone() == (2,)
        assert conn.execute("select %s::int * 2", (21,)).fetchone() == (42,)
