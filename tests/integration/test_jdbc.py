"""pgjdbc through the proxy: a server-side prepared statement whose results arrive in binary.

The driver jar comes from the distribution (Debian: ``apt-get install libpostgresql-jdbc-java``,
which puts it at /usr/share/java/postgresql.jar) or from ``PGJDBC_JAR``; Maven Central is not
assumed reachable. A tiny Java program, compiled with javac at test time, prints what it saw;
the test skips with the reason when java, javac or the jar is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import AGENT, AGENT_PASSWORD, RunningProxy

JAVA, JAVAC = shutil.which("java"), shutil.which("javac")
JAR_CANDIDATES = [os.environ.get("PGJDBC_JAR", ""), "/usr/share/java/postgresql.jar"]

SOURCE = r"""
import java.lang.reflect.Field;
import java.sql.*;

public class JdbcCheck {
    // pgjdbc keeps each column's wire format in PgResultSet.fields[i].getFormat() (1 = binary)
    static int format(ResultSet rs, int column) throws Exception {
        Object pg = rs.unwrap(Class.forName("org.postgresql.jdbc.PgResultSet"));
        Field f = pg.getClass().getDeclaredField("fields");
        f.setAccessible(true);
        Object field = ((Object[]) f.get(pg))[column - 1];
        return (Integer) field.getClass().getMethod("getFormat").invoke(field);
    }

    public static void main(String[] args) throws Exception {
        // prepareThreshold=-1: server-side prepare (and binary results) from the first run
        String url = args[0] + "?prepareThreshold=-1&binaryTransfer=true&sslmode=disable";
        try (Connection c = DriverManager.getConnection(url, args[1], args[2])) {
            try (PreparedStatement ps = c.prepareStatement(
                    "select ?::int4 * 2, ?::text, ?::bytea, ?::int8 + 1")) {
                for (int i = 1; i <= 3; i++) {
                    ps.setInt(1, 20 + i);
                    ps.setString(2, "Fake Name " + i);
                    ps.setBytes(3, new byte[] {0, 1, (byte) 254, (byte) i});
                    ps.setLong(4, 1L << 40);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        byte[] b = rs.getBytes(3);
                        System.out.println("row=" + rs.getInt(1) + "|" + rs.getString(2) + "|"
                            + b.length + ":" + (b[2] & 0xff) + ":" + b[3] + "|" + rs.getLong(4));
                        System.out.println("format=" + format(rs, 1) + "," + format(rs, 4));
                    }
                }
            }
            try (Statement s = c.createStatement()) {
                s.executeQuery("select * from pgproxy_no_such_table");
                System.out.println("error=none");
            } catch (SQLException e) {
                System.out.println("error=" + e.getSQLState());
            }
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("select 'ok'")) {
                rs.next();
                System.out.println("after=" + rs.getString(1));
            }
        }
    }
}
"""


@pytest.fixture(scope="module")
def jdbc_program(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    if JAVA is None or JAVAC is None:
        pytest.skip("java/javac are not installed")
    jar = next((p for p in JAR_CANDIDATES if p and Path(p).is_file()), None)
    if jar is None:
        pytest.skip("no pgjdbc jar: apt-get install libpostgresql-jdbc-java, or set PGJDBC_JAR")
    build = tmp_path_factory.mktemp("jdbc")
    (build / "JdbcCheck.java").write_text(SOURCE)
    proc = subprocess.run(
        [JAVAC, "-cp", jar, "-d", str(build), str(build / "JdbcCheck.java")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return jar, build


@pytest.mark.timeout(180)
def test_pgjdbc(jdbc_program: tuple[str, Path], running_proxy: RunningProxy) -> None:
    assert JAVA is not None
    jar, build = jdbc_program
    url = f"jdbc:postgresql://{running_proxy.host}:{running_proxy.port}/postgres"
    proc = subprocess.run(
        [JAVA, "-cp", f"{jar}{os.pathsep}{build}", "JdbcCheck", url, AGENT, AGENT_PASSWORD],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    rows = [
        line.removeprefix("row=") for line in proc.stdout.splitlines() if line.startswith("row=")
    ]
    assert rows == [f"{40 + 2 * i}|Fake Name {i}|4:254:{i}|{(1 << 40) + 1}" for i in (1, 2, 3)]
    assert lines.count("format=1,1") == 3  # int4 and int8 came back in binary
    assert "error=42P01" in lines
    assert "after=ok" in lines
