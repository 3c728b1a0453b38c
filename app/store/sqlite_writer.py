"""The SQLite store's writer process: makes each request it gets one transaction.

Run as ``python -P sqlite_writer.py PATH FD PRAGMA...`` by ``SqliteStore`` (app/store/
sqlite.py, "the write path"), by its path and not as a module of the package, so that it
starts in the time the interpreter takes and imports nothing of runcast.

It opens ``PATH`` and runs the ``PRAGMA`` statements, then answers once (None, or the
error). Each request is its size on stdin (8 bytes, little-endian) and a pickle of
``[(sql, parameters, many), ...]`` at the start of the file ``FD``; each answer, on
stdout, is the size and pickle of None or of the error that rolled the transaction back.
It ends when stdin does (the store closes it), and dies with the server (Linux: the
kernel kills it; elsewhere it checks before each commit), so that what it was writing
then is rolled back, as it would have been in the server's own process. It ignores
SIGINT and SIGTERM, which its process group may get (a terminal's ^C, a service
manager): the server writes through it once more as it shuts down.
"""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import struct
import sys
from collections.abc import Sequence
from typing import Any, BinaryIO

_PR_SET_PDEATHSIG = 1


def _die_with(server: int) -> None:
    """Be killed when the server dies (Linux); exit now if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        pass  # elsewhere: _transact checks that the server lives before each commit
    if os.getppid() != server:
        raise SystemExit(0)


def _answer(answers: BinaryIO, error: BaseException | None) -> None:
    data = pickle.dumps(error)
    try:
        answers.write(struct.pack("<Q", len(data)) + data)
        answers.flush()
    except BrokenPipeError:
        raise SystemExit(0) from None  # the server is gone


def _transact(
    connection: sqlite3.Connection, statements: Sequence[tuple[str, Any, bool]], server: int
) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        for sql, parameters, many in statements:
            if many:
                connection.executemany(sql, parameters)
            else:
                connection.execute(sql, parameters)
        if os.getppid() != server:
            # The server died while this was under way: rolled back, as it would have
            # been in the server's own process, not committed by an orphan (after the
            # crash, perhaps after a new server has begun on the file).
            raise SystemExit(0)
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def main(argv: Sequence[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    path, transfer, pragmas = argv[0], int(argv[1]), argv[2:]
    requests, answers = sys.stdin.buffer, sys.stdout.buffer
    server = os.getppid()
    _die_with(server)
    try:
        connection = sqlite3.connect(path, isolation_level=None)
        for pragma in pragmas:
            connection.execute(pragma)
    except sqlite3.Error as error:
        _answer(answers, error)
        raise SystemExit(1) from None
    _answer(answers, None)
    while len(header := requests.read(8)) == 8:
        (size,) = struct.unpack("<Q", header)
        try:
            _transact(connection, pickle.loads(os.pread(transfer, size, 0)), server)
        except sqlite3.Error as error:
            _answer(answers, error)
        except Exception as error:
            _answer(answers, RuntimeError(f"the writer process failed: {error!r}"))
        else:
            _answer(answers, None)
    connection.close()


if __name__ == "__main__":
    main(sys.argv[1:])
