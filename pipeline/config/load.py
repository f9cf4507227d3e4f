"""Loading: a TOML file (or already parsed data) into a :class:`Config`, or one error.

Every problem (unreadable file, TOML syntax, bad keys and values, cross-key conflicts) is
collected and raised together as one :class:`ConfigError`, so a user fixes a file in one
round instead of one mistake per run.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from pipeline.config.checks import cross_checks
from pipeline.config.schema import Config
from pipeline.config.walk import Loc, Walker


class ConfigError(Exception):
    """The configuration has problems; ``problems`` lists all of them, one line each."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems: list[str] = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


def embedded_default() -> Path:
    """The config used when none is given: the commented example shipped with the package
    (``config/pipeline.toml`` is a link to it), so the example always runs as-is."""
    return Path(str(resources.files("pipeline") / "data" / "default.toml"))


def parse_config(data: Mapping[str, Any], source: str,
                 env: Mapping[str, str] | None = None) -> Config:
    """Validate parsed TOML ``data`` (named ``source`` in messages) into a :class:`Config`.

    Environment overrides come from ``env`` (``os.environ`` when None). Raises
    :class:`ConfigError` listing every problem found, not only the first.
    """
    walker = Walker(source, os.environ if env is None else env)
    cfg = walker.table(Config, data, Loc(), None, "")
    for loc, text in cross_checks(cfg, walker.env):
        walker.problem(loc, text)
    if walker.problems:
        raise ConfigError(walker.problems)
    return cfg


def load_config(path: str | os.PathLike[str] | None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the TOML file at ``path``; None means the embedded default.

    Every problem (unreadable file, TOML syntax with its line and column, bad keys and
    values) is raised as one :class:`ConfigError`.
    """
    source = os.fspath(embedded_default() if path is None else path)
    try:
        with open(source, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise ConfigError([f"{source}: cannot read the file: {reason}"]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{source}: not utf-8 text (byte {exc.start})"]) from exc
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        raise ConfigError([f"{source}: invalid toml: {message[:1].lower()}{message[1:]}"]) \
            from exc
    except RecursionError as exc:
        raise ConfigError([f"{source}: invalid toml: tables or arrays nested too deep"]) from exc
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ConfigError([f"{source}: invalid toml: {str(exc).lower()}"]) from exc
    return parse_config(data, source, env)

