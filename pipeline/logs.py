"""Logging setup: readable console lines or JSON lines, with secrets masked.

Every configured secret (tokens, app secret, API keys, the DSN's password) is replaced by
``***`` in the message and in the bound extra fields before a record is written, so a
secret that slips into a log call still never reaches the log.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from loguru import logger

_CONSOLE = ("<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "<cyan>{extra[stage]}</cyan> {message}")


def _mask(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def setup_logging(level: str = "INFO", fmt: str = "console",
                  secrets: Iterable[str] = ()) -> None:
    """Send logs to stderr in ``fmt`` (``console`` or ``json``) from ``level`` up."""
    hidden = tuple(sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True))

    def patch(record: Any) -> None:
        record["extra"].setdefault("stage", "-")
        if hidden:
            record["message"] = _mask(record["message"], hidden)
            for key, value in record["extra"].items():
                if isinstance(value, str):
                    record["extra"][key] = _mask(value, hidden)

    logger.remove()
    logger.configure(patcher=patch)
    if fmt == "json":
        logger.add(sys.stderr, level=level, serialize=True, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=_CONSOLE, backtrace=False, diagnose=False,
                   colorize=None)


def dsn_password(dsn: str) -> str:
    """The password in a DSN (URL or key=value form), so it can be masked."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        value = conninfo_to_dict(dsn).get("password")
    except Exception:
        return ""
    return str(value) if value else ""
