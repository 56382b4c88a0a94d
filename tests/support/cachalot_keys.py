"""The table-key function of the cachalot guide (docs/howto/cachalot-sessions.rst).

cachalot's own table keys are bare SHA-1 digests; this one prefixes them,
so ``HERD_EXCLUDE`` can name them. Copied from the guide as a user would.
"""

from hashlib import sha1


def table_key(db_alias: str, table: str) -> str:
    return "cachalot-table:" + sha1(f"{db_alias}:{table}".encode()).hexdigest()
