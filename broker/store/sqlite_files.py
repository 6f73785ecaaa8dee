"""The store's file before and beside the read-write connection: what a file is, decided without
any connection that could write it; read-only connections; consistent backups.

A store is opened read-write only once it is known to be a broker store (of some schema
version) or new: another program's database, or one whose interrupted transaction could only
be rolled back by writing it, is refused with nothing created or changed next to it. Every
SQLite or OS failure is mapped to :class:`~broker.errors.StorageError` here.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from broker.errors import StorageError
from broker.store.sqlite_schema import refuse_a_foreign_database, stored_version

FILE_NAME = "broker.sqlite"


def storage_error(what: str, exc: BaseException) -> StorageError:
    """``what`` failed with an SQLite or OS error: ``unavailable``, with the error's text."""
    return StorageError(f"{what}: {exc}", code="unavailable")


#: A rollback journal's header begins with these bytes; the database's size in pages when its
#: transaction began is at offset 16 (https://www.sqlite.org/fileformat.html, "The Rollback
#: Journal").
_JOURNAL_MAGIC = bytes.fromhex("d9d505f920a163d7")


def _records_an_empty_database(path: Path) -> bool:
    """Whether ``path``'s rollback journal is that of the file's first transaction (0 pages when
    it began): its committed state is empty, whatever pages of the transaction reached the file
    before a crash (a broker that died creating its store)."""
    try:
        with open(f"{path}-journal", "rb") as journal:
            header = journal.read(20)
    except FileNotFoundError:
        return False
    return header[:8] == _JOURNAL_MAGIC and header[16:20] == bytes(4)


def _read_only_uri(path: Path) -> str:
    """A URI that reads ``path``'s committed state creating no file and writing none.

    ``mode=ro`` alone does not do that for a WAL database (header byte 19 is 2) whose ``-wal``
    and ``-shm`` do not exist (nobody has it open: the last connection to close deletes them):
    SQLite creates both, and a read-only connection cannot delete them again. So such a file is
    read with ``immutable=1``: no lock, no companion; with no ``-wal``, the file alone is its
    committed state, as its last connection checkpointed it. That is safe only while nobody
    writes it, which is why it is never used when the companions exist (``immutable`` would
    then miss what the -wal holds, e.g. a running broker's commits, and could read pages a
    checkpoint is rewriting): ``mode=ro`` then creates nothing, reads through the WAL with its
    locks, and, unable to lock the file for writing, never checkpoints a -wal into it (it may
    rebuild the -shm index, which holds nothing persistent). A rollback-journal file gets
    ``mode=ro`` too: a shared lock, so a consistent read while another program writes. The rare
    race (a process opens the file in WAL mode between this look and the read) is covered by
    the read-write check that :func:`~broker.store.sqlite_schema.prepare` repeats under the
    write lock before it creates anything.
    """
    with open(path, "rb") as file:
        header = file.read(20)
    in_wal_mode = len(header) == 20 and header[19] == 2
    wal, shm = (os.path.exists(f"{path}{suffix}") for suffix in ("-wal", "-shm"))
    uri = f"{path.resolve().as_uri()}?mode=ro"
    if wal and shm:
        return uri
    if in_wal_mode or wal or shm:  # SQLite would create the missing one
        return f"{uri}&immutable=1"
    return uri


def is_broker_store(path: Path) -> bool:
    """Whether ``path`` is a broker store (of any schema version: the caller checks that) rather
    than new: missing, empty, a database without tables, or a store whose creation by an
    earlier version was interrupted. Another program's database raises ``StorageError``,
    decided without any connection that could write it or create a file next to it."""
    if _records_an_empty_database(path):
        # The read-write open rolls the journal back (as any SQLite connection that may write
        # would), then creates the store; a transaction still running holds the write lock.
        return False
    try:
        if path.stat().st_size == 0:
            return False
        conn = sqlite3.connect(_read_only_uri(path), uri=True, isolation_level=None)
    except FileNotFoundError:
        return False
    except (sqlite3.Error, OSError) as exc:
        raise storage_error(f"cannot open the store {path}", exc) from exc
    try:
        if stored_version(conn) is not None:
            return True
        refuse_a_foreign_database(conn, path)
        return False
    except sqlite3.Error as exc:
        if exc.sqlite_errorcode == sqlite3.SQLITE_READONLY_ROLLBACK:
            raise StorageError(
                f"{path} has a transaction that was interrupted ({path}-journal): whether it is "
                "a broker store cannot be read without rolling it back, which writes the file; "
                "nothing was changed (if it is the broker's store, any SQLite connection that "
                f"may write rolls it back, e.g. sqlite3 {path} 'PRAGMA quick_check')") from exc
        raise storage_error(f"cannot open the store {path}", exc) from exc
    finally:
        conn.close()


def connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that cannot write the store (``mode=ro``); it never creates the file."""
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True,
                           isolation_level=None, check_same_thread=False)


def backup_store(data_dir: Path, dest: Path) -> None:
    """Copy a broker's store to ``dest``, also while the broker runs: SQLite's backup API in one
    step from its own read connection, so the copy is one committed state (WAL mode: the
    broker's writer is not blocked) and is checked with ``PRAGMA integrity_check``."""
    source_path = (data_dir / FILE_NAME).resolve()
    if not source_path.is_file():
        raise StorageError(f"no store at {source_path}")
    if dest.exists():
        raise StorageError(f"{dest} exists; a backup never overwrites")
    # Written under a temporary name (mode 0600, like the store) and renamed when complete and
    # checked: an interrupted backup never leaves a file that looks like a good one.
    partial = dest.with_name(f".{dest.name}.partial")
    try:
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        source = connect_read_only(source_path)
        target = sqlite3.connect(partial)
        try:
            source.backup(target)
            (verdict,) = target.execute("PRAGMA integrity_check").fetchone()
            if verdict != "ok":
                raise StorageError(f"the backup fails its integrity check: {verdict}")
        finally:
            target.close()
            source.close()
        if dest.exists():
            raise StorageError(f"{dest} appeared meanwhile; a backup never overwrites")
        os.replace(partial, dest)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        raise storage_error(f"backup to {dest} failed", exc) from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
