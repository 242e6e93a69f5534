"""Every evolutions shard's SHA-256 is recorded when it is written; on resume a shard that does
not match it (truncated, zero-length, altered but still valid Parquet) or has none (a stop
between the two writes) is removed with a warning naming the reason, and never read as data.
The readers of ``evolutions/`` skip the hash files. No Ray, no model: the real writer
(``write_shard``) and the real resume scan (``done_seed_ids``) on hand-built chains.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from test_manifest import chain, level

from ecd_ray.pipeline import manifest as mf
from ecd_ray.pipeline.chain_actor import write_shard


def _chains(*ids: str) -> list[dict]:
    return [chain(i, [level(0, [], [], [], 5), level(1, [], [], [], 6)], "completed")
            for i in ids]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Five shards of two chains each, as chain actors write them."""
    out = tmp_path / "evolutions"
    for n in range(5):
        write_shard(_chains(f"s{2 * n}", f"s{2 * n + 1}"), out, f"part-000-abc-{n:06d}.parquet")
    return out


def test_write_shard_records_the_sha256_of_the_bytes_on_disk(folder: Path) -> None:
    for shard in mf.shards(folder):
        side = mf.hash_path(shard)
        assert side.name == f".{shard.name}.sha256"
        digest, name = side.read_text().split()
        assert (digest, name) == (hashlib.sha256(shard.read_bytes()).hexdigest(), shard.name)
        assert mf.shard_problem(shard) is None
    assert len(mf.done_seed_ids(folder)) == 10


def test_readers_of_the_folder_skip_the_hash_files(folder: Path) -> None:
    assert all(p.suffix == ".parquet" for p in mf.shards(folder))
    assert pads.dataset(folder, format="parquet").count_rows() == 10
    assert len(list(folder.glob(".*.sha256"))) == 5


def test_resume_removes_every_shard_that_does_not_match_its_hash(
        folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = mf.shards(folder)
    whole = shards[0].read_bytes()
    shards[0].write_bytes(whole[: len(whole) - 100])  # truncated (footer lost)
    shards[1].write_bytes(b"")  # zero-length
    # altered but still valid Parquet with the same seed ids: only the hash can tell
    table = pq.read_table(shards[2])
    rows = table.to_pylist()
    rows[0]["levels"][1]["response"] = "not what the teacher said"
    pq.write_table(table.from_pylist(rows, schema=table.schema), shards[2])
    assert pq.read_table(shards[2]).num_rows == 2
    mf.hash_path(shards[3]).unlink()  # a stop between the shard's rename and its hash
    orphan = mf.hash_path(folder / "part-000-abc-000099.parquet")
    orphan.write_text("0" * 64 + "  part-000-abc-000099.parquet\n")  # its shard is gone
    with caplog.at_level(logging.WARNING):
        done = mf.done_seed_ids(folder)
    assert len(done) == 2 and "s8" in done and "s9" in done  # only the intact shard
    assert [p.name for p in mf.shards(folder)] == [shards[4].name]
    assert sorted(p.name for p in folder.glob(".*")) == [mf.hash_path(shards[4]).name]
    log = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records}
    assert "does not match" in log[f"removing {shards[0]}"]
    assert "zero-length" in log[f"removing {shards[1]}"]
    assert "does not match" in log[f"removing {shards[2]}"]
    assert "no recorded SHA-256" in log[f"removing {shards[3]}"]
    assert f"removing {orphan}" in log
    assert all("redone" in m for k, m in log.items() if k != f"removing {orphan}")


@pytest.mark.parametrize("fails", ["shard", "hash"])
def test_a_failed_write_leaves_no_shard_and_no_temporary_file(tmp_path: Path, fails: str) -> None:
    """A real ENOSPC (``/dev/full``) while the shard, or its hash after the shard's rename, is
    written: nothing is left, not even a whole shard without its hash."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    out = tmp_path / "evolutions"
    out.mkdir()
    name = "part-000-abc-000000.parquet"
    tmp = f".{name}.tmp" if fails == "shard" else f".{name}.sha256.tmp"
    (out / tmp).symlink_to("/dev/full")
    with pytest.raises(OSError) as err:
        write_shard(_chains("s0"), out, name)
    assert err.value.errno == 28
    assert list(out.iterdir()) == []
