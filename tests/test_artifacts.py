"""Artifact tables: schema round trip, rejection of wrong schemas, atomic writes, provenance."""

import os
import subprocess
import sys

import pyarrow as pa
import pytest

from llmpq.artifacts import SchemaError, atomic_path, provenance, read_meta, read_table, write_table

ROW = {"layer": 0, "bits": 4, "indicator": "variance", "omega": 0.25}


def test_round_trip_with_provenance(tmp_path):
    path = write_table("sensitivity", [ROW, {**ROW, "layer": 1}], tmp_path / "s.parquet", provenance("abc123", device="cpu"))
    table = read_table("sensitivity", path)
    assert table.column("layer").to_pylist() == [0, 1]
    assert table.schema.field("bits").type == pa.int16()
    meta = read_meta(path)
    assert meta["config_hash"] == "abc123" and meta["kind"] == "sensitivity" and meta["llmpq_version"]
    assert meta["torch_version"]


def test_missing_column_rejected_on_write(tmp_path):
    with pytest.raises(SchemaError, match="missing \\['omega'\\]"):
        write_table("sensitivity", {"layer": [0], "bits": [4], "indicator": ["v"]}, tmp_path / "s.parquet")
    assert not (tmp_path / "s.parquet").exists()


@pytest.mark.parametrize("row, word", [({k: v for k, v in ROW.items() if k != "omega"}, "missing"),
                                       ({**ROW, "omgea": 0.1}, "unexpected")])
def test_row_keys_must_match_schema(tmp_path, row, word):
    with pytest.raises(SchemaError, match=f"row 1: .*{word} \\['om"):
        write_table("sensitivity", [ROW, row], tmp_path / "s.parquet")
    assert not (tmp_path / "s.parquet").exists()


def test_wrong_type_rejected_on_write(tmp_path):
    with pytest.raises(SchemaError, match="omega"):
        write_table("sensitivity", {"layer": [0], "bits": [4], "indicator": ["v"], "omega": ["high"]}, tmp_path / "s.parquet")


def test_wrong_kind_rejected_on_read(tmp_path):
    path = write_table("sensitivity", [ROW], tmp_path / "s.parquet")
    with pytest.raises(SchemaError, match="is a sensitivity table"):
        read_table("plan_layers", path)


def test_foreign_parquet_rejected_on_read(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"layer": [0], "bits": [4]}), tmp_path / "x.parquet")
    with pytest.raises(SchemaError, match="missing"):
        read_table("sensitivity", tmp_path / "x.parquet")


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_killed_writer_leaves_no_file(tmp_path):
    """A process killed while writing leaves no artifact at the target path."""
    target = tmp_path / "t.parquet"
    code = (
        "import os, signal\n"
        "from llmpq.artifacts import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n"
        "    tmp.write_text('partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code])
    assert proc.returncode != 0
    assert not target.exists()
    assert all(p.name.startswith(".t.parquet.") for p in tmp_path.iterdir())


def test_overwrite_is_atomic(tmp_path):
    path = tmp_path / "s.parquet"
    write_table("sensitivity", [ROW], path)
    inode_before = os.stat(path).st_ino
    write_table("sensitivity", [{**ROW, "omega": 1.0}], path)
    assert read_table("sensitivity", path).column("omega").to_pylist() == [1.0]
    assert os.stat(path).st_ino != inode_before
