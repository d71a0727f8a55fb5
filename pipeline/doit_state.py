"""A doit state backend that survives a killed run.

doit's sqlite3 backend keeps every change in memory and writes it when the run ends,
so a run killed with SIGKILL forgets even the tasks it finished, and the next run
redoes them all. This one commits each change as doit records it (WAL journal, no
fsync per commit: a killed process loses nothing, a power cut at most the last tasks).
"""

from __future__ import annotations

from doit.dependency import SqliteDB


class DurableSqliteDB(SqliteDB):
    desc = "sqlite3, committed after every change so a killed run keeps its finished tasks"

    def _sqlite3(self, name):
        connection = super()._sqlite3(name)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    def set(self, task_id, dependency, value):
        super().set(task_id, dependency, value)
        self._conn.execute(
            "insert or replace into doit values (?,?)",
            (task_id, self.codec.encode(self._cache[task_id])),
        )
        self._conn.commit()
        self._dirty.discard(task_id)

    def remove(self, task_id):
        super().remove(task_id)
        self._conn.commit()

    def remove_all(self):
        super().remove_all()
        self._conn.commit()
