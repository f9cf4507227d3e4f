"""The configuration: one TOML file, parsed once at start into frozen records.

Every section is an attrs class (``schema.py``). Its annotations give the type of each key
(``Literal`` lists the choices) and each field carries a :class:`Spec` in its metadata
(``spec.py``): bounds, string rules, secrecy, an environment override (``env.py``) and a
one-line doc. One generic walker (``walk.py``) turns the parsed TOML into these classes and
collects *every* problem with its key path, so that ``check-config`` explains a whole file at
once; a few cross-key checks (``checks.py``) run on the result; ``load.py`` ties them together.
The same specs give the key reference of config/README.md (``reference.py``). Stages receive
these records and never read files or the environment themselves (STYLE.md, rule 12).

Import from here, not from the modules: they are how the package is arranged, not its API.
"""

from pipeline.config.checks import dsn_problem
from pipeline.config.load import ConfigError, embedded_default, load_config, parse_config
from pipeline.config.reference import Setting, redacted, reference, reference_rows
from pipeline.config.schema import (
    LOADS,
    BufferConfig,
    BusinessHoursConfig,
    Channel,
    Config,
    ConsoleConfig,
    ContextConfig,
    ContextMode,
    DatabaseConfig,
    DedupeConfig,
    DispatchConfig,
    EscalationConfig,
    InstanceConfig,
    InstanceTransport,
    IntakeConfig,
    LoadConfig,
    LoadName,
    LoadPolicy,
    LogFormat,
    LoggingConfig,
    LogLevel,
    MetricsConfig,
    PipelineConfig,
    ReplayConfig,
    ResponderConfig,
    ResponderKind,
    RetentionConfig,
    RuleConfig,
    Transport,
    WebhookConfig,
    Weekday,
)
from pipeline.config.spec import Spec, setting

__all__ = [
    "LOADS", "BufferConfig", "BusinessHoursConfig", "Channel", "Config", "ConfigError",
    "ConsoleConfig", "ContextConfig", "ContextMode", "DatabaseConfig", "DedupeConfig",
    "DispatchConfig", "EscalationConfig", "InstanceConfig", "InstanceTransport", "IntakeConfig",
    "LoadConfig", "LoadName", "LoadPolicy", "LogFormat", "LogLevel", "LoggingConfig",
    "MetricsConfig", "PipelineConfig", "ReplayConfig", "ResponderConfig", "ResponderKind",
    "RetentionConfig", "RuleConfig", "Setting", "Spec", "Transport", "WebhookConfig", "Weekday",
    "dsn_problem", "embedded_default", "load_config", "parse_config", "redacted", "reference",
    "reference_rows", "setting",
]
