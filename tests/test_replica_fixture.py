"""The `replicated` fixture: a real primary streaming to a real hot standby (proxy.devdb.TempReplica)."""

from __future__ import annotations

import time


def test_a_row_committed_on_the_primary_shows_on_the_replica(replicated):
    primary, replica = replicated.primary, replicated.replica
    primary.psql("CREATE TABLE fx (id int PRIMARY KEY); INSERT INTO fx VALUES (1)")
    commit_lsn = primary.lsn()
    replica.wait_caught_up(10)
    assert replica.psql("SELECT id FROM fx").split() == ["1"]
    assert replica.psql("SELECT pg_is_in_recovery()").strip() == "t"
    assert replica.replay_lsn() >= commit_lsn


def test_paused_replay_hides_new_rows_until_resumed(replicated):
    primary, replica = replicated.primary, replicated.replica
    replica.pause_replay()
    try:
        before = replica.replay_lsn()
        primary.psql("INSERT INTO fx VALUES (2)")
        target = primary.lsn()
        # the WAL arrives (receive position passes the commit) but is not applied
        deadline = time.monotonic() + 10
        while replica.lsn("pg_last_wal_receive_lsn()") < target:
            assert time.monotonic() < deadline, "the replica never received the commit"
            time.sleep(0.02)
        assert replica.psql("SELECT count(*) FROM fx WHERE id = 2").strip() == "0"
        assert replica.replay_lsn() == before
    finally:
        replica.resume_replay()
    replica.wait_caught_up(10)
    assert replica.psql("SELECT count(*) FROM fx WHERE id = 2").strip() == "1"


def test_a_second_replica_streams_too(replicated):
    second = replicated.add_replica()
    replicated.primary.psql("INSERT INTO fx VALUES (3)")
    second.wait_caught_up(10)
    assert second.psql("SELECT count(*) FROM fx").strip() == "3"
    second.stop("kill")
    second.start()
    replicated.primary.psql("INSERT INTO fx VALUES (4)")
    second.wait_caught_up(10)
    assert second.psql("SELECT count(*) FROM fx").strip() == "4"


def test_promote_ends_recovery(replicated):  # last: the replica no longer follows the primary
    replica = replicated.replica
    replica.promote()
    assert replica.psql("SELECT pg_is_in_recovery()").strip() == "f"
    replica.psql("INSERT INTO fx VALUES (100)")  # writable now
    assert replicated.primary.psql("SELECT count(*) FROM fx WHERE id = 100").strip() == "0"
