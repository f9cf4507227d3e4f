"""The configuration: example file, defaults, every kind of problem, env overrides, redaction."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import (
    LOADS,
    Config,
    ConfigError,
    InstanceConfig,
    LoadConfig,
    ResponderConfig,
    RuleConfig,
    embedded_default,
    load_config,
    parse_config,
    redacted,
    reference,
    reference_rows,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config" / "pipeline.toml"
README = ROOT / "config" / "README.md"
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "config"
ACME = {"name": "acme"}


def problems_of(data: dict[str, Any], env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "x.toml", env or {})
    return info.value.problems


def load_problems(path: Path | str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    return info.value.problems


def with_acme(data: dict[str, Any]) -> dict[str, Any]:
    return {"instances": [ACME], **data}


# --- the example and the reference ------------------------------------------------------------

def test_example_loads_without_problems() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert [i.name for i in cfg.instances] == ["demo", "loja"]
    assert cfg.database.dsn == ""
    assert cfg.dispatch.transport == "dry"
    assert cfg.responders["rules"].kind == "rules"
    assert {r.match for r in cfg.responders["rules"].rules} >= {"price*", "preç*"}
    assert cfg.instance_by_phone_number_id == {"1122334455667": "demo"}
    assert cfg.instance_by_evolution_name == {"demo": "demo", "loja": "loja"}
    assert cfg.instance("loja").max_failed_answers == 2


def _present(data: dict[str, Any], table: str, key: str) -> bool:
    """Whether the parsed example has ``key`` of ``table`` (a reference row) somewhere."""
    path = table.strip("[]").split(".")
    tables: list[Any] = [data]
    for part in path:
        if part.startswith("<"):
            tables = [v for t in tables for v in t.values()]
        else:
            tables = [t[part] for t in tables if part in t]
    if table.startswith("[["):
        tables = [item for t in tables for item in t]
    if "[]." in key:
        array, key = key.split("[].")
        tables = [item for t in tables for item in t.get(array, [])]
    return any(key in t for t in tables)


def test_example_has_every_key_and_readme_documents_every_key() -> None:
    data = tomllib.loads(EXAMPLE.read_text("utf-8"))
    readme = README.read_text("utf-8")
    rows = reference()
    assert len(rows) > 60
    for row in rows:
        assert _present(data, row.table, row.key), (row.table, row.key)
        assert f"| `{row.table}` | `{row.key}` |" in readme, (row.table, row.key)
        if row.env:
            assert f"`{row.env}`" in readme


def test_readme_table_is_the_generated_reference() -> None:
    readme = README.read_text("utf-8").splitlines()
    rows = [line for line in readme if line.startswith("| `[")]
    assert rows == reference_rows(), "regenerate config/README.md from reference_rows()"


def test_reference_defaults_are_the_class_defaults() -> None:
    rows = {(r.table, r.key): r for r in reference()}
    assert rows["[database]", "pool_size"].default == "10"
    assert rows["[database]", "pool_size"].type == "an integer between 1 and 1000"
    assert rows["[database]", "dsn"].secret
    assert rows["[webhook]", "port"].default == "8080"
    assert rows["[responders.<responder>]", "rules[].confidence"].default == "0.9"
    assert rows["[[instances]]", "responder"].default == '"rules"'


# --- defaults ---------------------------------------------------------------------------------

def test_embedded_default_is_the_example() -> None:
    assert load_config(None, env={}) == load_config(EXAMPLE, env={})
    assert EXAMPLE.resolve() == embedded_default().resolve()


def test_schema_defaults() -> None:
    cfg = parse_config({"instances": [{"name": "demo", "phone_number_id": "1122334455667",
                                       "evolution_instance": "demo"}]}, "x", env={})
    assert cfg.pipeline.max_active_conversations == 64
    assert cfg.pipeline.channel_capacity == 16
    assert cfg.database.dsn == "" and cfg.database.pool_size == 10
    assert cfg.database.migrate_on_start is True
    assert cfg.logging.level == "INFO" and cfg.logging.format == "console"
    assert cfg.webhook.port == 8080 and cfg.webhook.max_body_bytes == 1048576
    assert cfg.intake.buffer.window_ms == 1500 and cfg.intake.buffer.max_wait_ms == 5000
    assert cfg.dedupe.content_window_s == 30.0
    assert cfg.context.mode == "claimed"
    assert cfg.escalation.keywords[:2] == ("human", "agent")
    assert cfg.dispatch.transport == "dry" and cfg.dispatch.backoff_max_s == 300.0
    assert cfg.responders == {"rules": ResponderConfig()}
    assert cfg.instances == (InstanceConfig(name="demo", phone_number_id="1122334455667",
                                            evolution_instance="demo"),)
    assert cfg.instance_by_phone_number_id == {"1122334455667": "demo"}
    assert cfg.instance_by_evolution_name == {"demo": "demo"}
    assert cfg.instance("demo").responder == "rules"


def test_load_policies_default_per_load() -> None:
    loads = load_config(None, env={}).context.loads
    assert list(loads) == list(LOADS)
    assert {name: load.policy for name, load in loads.items()} == {
        "conversation": "required", "history": "default", "webhook": "default",
        "escalation": "required", "interactions": "default",
    }


def test_a_load_table_changes_only_the_keys_it_names() -> None:
    cfg = parse_config(with_acme({"context": {"loads": {"conversation": {"timeout_ms": 50}}}}),
                       "x.toml", {})
    assert cfg.context.loads["conversation"] == LoadConfig(timeout_ms=50.0, policy="required")
    assert cfg.context.loads["history"] == LoadConfig()


def test_minimal_file_and_instance_defaults() -> None:
    cfg = load_config(FIXTURES / "minimal.toml", env={})
    assert cfg == Config(instances=(InstanceConfig(name="acme"),))
    acme = cfg.instance("acme")
    assert acme.evolution_instance == "acme"  # defaults to the name
    assert acme.responder == "rules" and acme.max_failed_answers == 0
    assert cfg.instance_by_phone_number_id == {}
    assert cfg.instance_by_evolution_name == {"acme": "acme"}
    with pytest.raises(KeyError):
        cfg.instance("nobody")


def test_records_are_frozen() -> None:
    cfg = load_config(None, env={})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        cfg.pipeline.channel_capacity = 3  # type: ignore[misc]


def test_conversions() -> None:
    cfg = parse_config(with_acme({
        "pipeline": {"shutdown_grace_s": 3},
        "logging": {"level": "debug"},
        "escalation": {"keywords": ["help"]},
        "responders": {"faq": {"rules": [{"match": "price", "reply": "10"},
                                         {"match": "hours", "reply": "9-5", "confidence": 1}]}},
    }), "x.toml", {})
    assert cfg.pipeline.shutdown_grace_s == 3.0
    assert type(cfg.pipeline.shutdown_grace_s) is float  # an int is accepted for a float
    assert cfg.logging.level == "DEBUG"
    assert cfg.escalation.keywords == ("help",)
    assert cfg.responders["faq"].rules == (RuleConfig("price", "10", 0.9),
                                           RuleConfig("hours", "9-5", 1.0))
    assert "rules" in cfg.responders  # the default responder stays


# --- one problem each -------------------------------------------------------------------------

ONE_PROBLEM = [
    ({"context": {"hsitory_chars": 5}},
     r"x\.toml: \[context\] unknown key 'hsitory_chars' \(did you mean 'history_chars'\?\)"),
    ({"pipelin": {}}, r"x\.toml: unknown key 'pipelin' \(did you mean 'pipeline'\?\)"),
    ({"webhook": {"zzz": 1}}, r"x\.toml: \[webhook\] unknown key 'zzz'"),
    ({"context": {"loads": {"histroy": {}}}},
     r"x\.toml: \[context\.loads\] unknown key 'histroy' \(did you mean 'history'\?\)"),
    ({"responders": {"faq": {"rules": [{"mtch": "a", "match": "b", "reply": "c"}]}}},
     r"x\.toml: \[responders\.faq\] rules\[0\] unknown key 'mtch' \(did you mean 'match'\?\)"),
    # wrong type
    ({"database": {"pool_size": "ten"}},
     r"x\.toml: \[database\] pool_size must be an integer between 1 and 1000, not 'ten'"),
    ({"database": {"dsn": 5}},  # a secret: its wrong value is never echoed
     r"x\.toml: \[database\] dsn must be a string, not an integer"),
    ({"database": {"query_timeout_s": "1m"}},
     r"x\.toml: \[database\] query_timeout_s must be a number > 0, not '1m'"),
    ({"escalation": {"keywords": "human"}},
     r"x\.toml: \[escalation\] keywords must be an array of strings, not 'human'"),
    ({"webhook": 3}, r"x\.toml: webhook must be a table, not 3"),
    ({"context": {"loads": {"history": 500}}},
     r"x\.toml: \[context\.loads\] history must be a table, not 500"),
    # a bool is not an int and an int is not a bool
    ({"pipeline": {"channel_capacity": True}},
     r"x\.toml: \[pipeline\] channel_capacity must be an integer >= 1, not true"),
    ({"database": {"migrate_on_start": 1}},
     r"x\.toml: \[database\] migrate_on_start must be true or false, not 1"),
    ({"pipeline": {"shutdown_grace_s": False}},
     r"x\.toml: \[pipeline\] shutdown_grace_s must be a number >= 0, not false"),
    # out of range
    ({"database": {"pool_size": 0}},
     r"x\.toml: \[database\] pool_size must be an integer >= 1, not 0"),
    ({"database": {"tcp_port": 70000}},
     r"x\.toml: \[database\] tcp_port must be an integer <= 65535, not 70000"),
    ({"database": {"query_timeout_s": 0}},
     r"x\.toml: \[database\] query_timeout_s must be a number > 0, not 0"),
    ({"escalation": {"min_confidence": 1.5}},
     r"x\.toml: \[escalation\] min_confidence must be a number <= 1, not 1\.5"),
    ({"dedupe": {"content_window_s": math.nan}},
     r"x\.toml: \[dedupe\] content_window_s must be a number >= 0, not nan"),
    ({"dedupe": {"content_window_s": math.inf}},
     r"x\.toml: \[dedupe\] content_window_s must be a number >= 0, not inf"),
    ({"context": {"loads": {"history": {"timeout_ms": -1}}}},
     r"x\.toml: \[context\.loads\.history\] timeout_ms must be a number > 0, not -1"),
    ({"responders": {"faq": {"rules": [{"match": "a", "reply": "b", "confidence": 2}]}}},
     r"x\.toml: \[responders\.faq\] rules\[0\]\.confidence must be a number <= 1, not 2"),
    # bad choice
    ({"logging": {"format": "jsn"}},
     r"x\.toml: \[logging\] format must be one of 'console', 'json', not 'jsn' "
     r"\(did you mean 'json'\?\)"),
    ({"logging": {"level": "verbose"}},
     r"x\.toml: \[logging\] level must be one of 'TRACE', .*, 'CRITICAL' \(any case\), "
     r"not 'verbose'"),
    ({"dispatch": {"transport": 1}},
     r"x\.toml: \[dispatch\] transport must be one of 'dry', 'evolution', 'cloud-api', not 1"),
    ({"context": {"loads": {"history": {"policy": "maybe"}}}},
     r"x\.toml: \[context\.loads\.history\] policy must be one of 'required', 'default', "
     r"not 'maybe'"),
    # missing or empty required values
    ({"responders": {"gpt": {"kind": "openai", "model": "m"}}},
     r"x\.toml: \[responders\.gpt\] url is required when kind = 'openai'"),
    ({"responders": {"gpt": {"kind": "openai", "url": "https://x"}}},
     r"x\.toml: \[responders\.gpt\] model is required when kind = 'openai'"),
    ({"responders": {"faq": {"rules": [{"match": "a"}]}}},
     r"x\.toml: \[responders\.faq\] rules\[0\]\.reply is required"),
    ({"responders": {"faq": {"rules": [{"match": "", "reply": "b"}]}}},
     r"x\.toml: \[responders\.faq\] rules\[0\]\.match must be a non-empty string, not ''"),
    ({"escalation": {"keywords": ["human", ""]}},
     r"x\.toml: \[escalation\] keywords\[1\] must be a non-empty string, not ''"),
    ({"dispatch": {"transport": "evolution"}},
     r"x\.toml: \[dispatch\] base_url is required when transport = 'evolution'"),
    # keys that do not fit together
    ({"responders": {"faq": {"url": "https://x"}}},
     r"x\.toml: \[responders\.faq\] url applies only when kind = 'openai', not 'rules'"),
    ({"responders": {"gpt": {"kind": "openai", "url": "https://x", "model": "m",
                             "rules": [{"match": "a", "reply": "b"}]}}},
     r"x\.toml: \[responders\.gpt\] rules applies only when kind = 'rules', not 'openai'"),
    ({"escalation": {"keywords": ["human", "!!!"]}},
     r"x\.toml: \[escalation\] keywords entries must contain a letter or digit to match, "
     r"not '!!!'"),
    ({"responders": {"gpt": {"kind": "openai", "url": "ftp://x", "model": "m"}}},
     r"x\.toml: \[responders\.gpt\] url must be a url starting with http:// or https://, "
     r"not 'ftp://x'"),
    ({"dispatch": {"backoff_initial_s": 30, "backoff_max_s": 10}},
     r"x\.toml: \[dispatch\] backoff_max_s must be >= backoff_initial_s \(30\.0\), not 10\.0"),
]


@pytest.mark.parametrize(("data", "pattern"), ONE_PROBLEM)
def test_one_problem(data: dict[str, Any], pattern: str) -> None:
    problems = problems_of(with_acme(data))
    assert len(problems) == 1, problems
    assert re.fullmatch(pattern, problems[0]), problems[0]


INSTANCE_PROBLEMS = [
    ([{}], r"x\.toml: \[\[instances\]\]\[0\] name is required"),
    ([{"name": ""}], r"x\.toml: \[\[instances\]\]\[0\] name must be a non-empty string, not ''"),
    ([ACME, {"name": "acme"}],
     r"x\.toml: \[\[instances\]\]\[1\] name 'acme' is already used by \[\[instances\]\]\[0\]"),
    ([{"name": "a", "phone_number_id": "1"}, {"name": "b"}, {"name": "c", "phone_number_id": "1"}],
     r"x\.toml: \[\[instances\]\]\[2\] phone_number_id '1' is already used by "
     r"\[\[instances\]\]\[0\]"),
    ([{"name": "a"}, {"name": "b", "evolution_instance": "a"}],
     r"x\.toml: \[\[instances\]\]\[1\] evolution_instance 'a' is already used by "
     r"\[\[instances\]\]\[0\]"),
    ([{"name": "a", "responder": "ruels"}],
     r"x\.toml: \[\[instances\]\]\[0\] responder must name a responder of \[responders\], "
     r"not 'ruels' \(did you mean 'rules'\?\)"),
    ([{"name": "a", "max_failed_answers": -1}],
     r"x\.toml: \[\[instances\]\]\[0\] max_failed_answers must be an integer >= 0, not -1"),
    ([{"name": "a", "webhook_url": "example.com"}],
     r"x\.toml: \[\[instances\]\]\[0\] webhook_url must be a url starting with http:// or "
     r"https://, not 'example\.com'"),
    ([ACME, "acme"], r"x\.toml: \[\[instances\]\]\[1\] must be a table, not 'acme'"),
    ([], r"x\.toml: \[\[instances\]\] is missing: at least one instance is needed"),
]


@pytest.mark.parametrize(("instances", "pattern"), INSTANCE_PROBLEMS)
def test_instance_problem(instances: list[Any], pattern: str) -> None:
    problems = problems_of({"instances": instances})
    assert len(problems) == 1, problems
    assert re.fullmatch(pattern, problems[0]), problems[0]


def test_no_instances_at_all() -> None:
    problems = load_problems(FIXTURES / "no_instances.toml")
    assert len(problems) == 1
    assert re.fullmatch(r".*/no_instances\.toml: \[\[instances\]\] is missing: "
                        r"at least one instance is needed", problems[0])


# --- file problems ----------------------------------------------------------------------------

def test_syntax_error_names_file_line_and_column() -> None:
    (problem,) = load_problems(FIXTURES / "syntax_error.toml")
    assert re.fullmatch(r".*/fixtures/config/syntax_error\.toml: invalid toml: "
                        r"expected '=' after a key .*\(at line 4, column \d+\)", problem), problem


def test_missing_file() -> None:
    (problem,) = load_problems(FIXTURES / "nope.toml")
    assert re.fullmatch(r".*/nope\.toml: cannot read the file: no such file or directory",
                        problem), problem


def test_directory_instead_of_file() -> None:
    (problem,) = load_problems(FIXTURES)
    assert re.fullmatch(r".*/fixtures/config: cannot read the file: is a directory", problem)


def test_not_utf8() -> None:
    (problem,) = load_problems(FIXTURES / "not_utf8.toml")
    assert re.fullmatch(r".*/not_utf8\.toml: not utf-8 text \(byte \d+\)", problem), problem


def test_source_is_the_path_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    problems = load_problems("tests/fixtures/config/no_instances.toml")
    assert problems[0].startswith("tests/fixtures/config/no_instances.toml: ")


MANY = [
    r"unknown key 'pipelin' \(did you mean 'pipeline'\?\)",
    r"\[database\] tcp_port must be an integer <= 65535, not 65536",
    r"\[database\] pool_size must be an integer >= 1, not 0",
    r"\[database\] migrate_on_start must be true or false, not 1",
    r"\[logging\] level must be one of .* \(any case\), not 'verbose'",
    r"\[logging\] format must be one of 'console', 'json', not 'jsn' \(did you mean 'json'\?\)",
    r"\[context\] unknown key 'hsitory_chars' \(did you mean 'history_chars'\?\)",
    r"\[context\] mode must be one of .*, not 'parallell' \(did you mean 'parallel'\?\)",
    r"\[context\.loads\] unknown key 'histroy' \(did you mean 'history'\?\)",
    r"\[context\.loads\.webhook\] timeout_ms must be a number > 0, not -5",
    r"\[context\.loads\.webhook\] policy must be one of 'required', 'default', not 'optional'",
    r"\[escalation\] keywords\[1\] must be a non-empty string, not ''",
    r"\[escalation\] min_confidence must be a number <= 1, not 1\.5",
    r"\[responders\.faq\] rules\[1\]\.match must be a non-empty string, not ''",
    r"\[responders\.faq\] rules\[2\] unknown key 'mtch' \(did you mean 'match'\?\)",
    r"\[responders\.faq\] rules\[2\]\.match is required",
    r"\[responders\.faq\] rules\[2\]\.confidence must be a number between 0 and 1, not true",
    r"\[responders\.faq\] url applies only when kind = 'openai', not 'rules'",
    r"\[responders\.gpt\] url must be a url starting with http:// or https://, "
    r"not 'ftp://example\.com'",
    r"\[responders\.gpt\] model is required when kind = 'openai'",
    r"\[\[instances\]\]\[2\] name is required",
    r"\[\[instances\]\]\[1\] name 'acme' is already used by \[\[instances\]\]\[0\]",
    r"\[\[instances\]\]\[1\] phone_number_id '123' is already used by \[\[instances\]\]\[0\]",
    r"\[\[instances\]\]\[0\] responder must name a responder of \[responders\], not 'fqa' "
    r"\(did you mean 'faq'\?\)",
    r"\[dispatch\] base_url is required when transport = 'cloud-api'",
    r"\[dispatch\] backoff_max_s must be >= backoff_initial_s \(30\.0\), not 10\.0",
]


def test_every_problem_of_a_file_is_reported() -> None:
    path = FIXTURES / "many_problems.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    problems = info.value.problems
    assert len(problems) == len(MANY), "\n".join(problems)
    for problem, pattern in zip(problems, MANY, strict=True):
        assert re.fullmatch(re.escape(f"{path}: ") + pattern, problem), problem
    assert str(info.value) == "\n".join(problems)  # one problem a line


def test_wrong_shapes_everywhere() -> None:
    path = FIXTURES / "nasty.toml"
    problems = load_problems(path)
    prefix = re.escape(f"{path}: ")
    expected = [
        r"pipeline must be a table, not 3",
        r"\[metrics\] summary must be true or false, not 1979-05-27T07:32:00\+00:00",
        r"webhook must be a table, not \[1, 2\]",
        r"\[dedupe\] content_window_s must be a number >= 0, not inf",
        r"\[context\] loads must be a table, not 'all of them'",
        r"\[responders\] faq must be a table, not 'not a table'",
        r"instances must be an array of tables, not a table",
        r"\[\[instances\]\] is missing: at least one instance is needed",
    ]
    assert len(problems) == len(expected), "\n".join(problems)
    for problem, pattern in zip(problems, expected, strict=True):
        assert re.fullmatch(prefix + pattern, problem), problem


def test_document_that_is_not_a_table() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config([1, 2], "x.toml", {})  # type: ignore[arg-type]
    assert info.value.problems[0] == "x.toml: must be a table, not [1, 2]"


def test_config_error_str_lists_problems() -> None:
    error = ConfigError(["a: one", "a: two"])
    assert error.problems == ["a: one", "a: two"]
    assert str(error) == "a: one\na: two"


# --- environment ------------------------------------------------------------------------------

ENV = {
    "PIPELINE_DATABASE_DSN": "postgresql://app:hunter2@db/pipeline",
    "PIPELINE_WEBHOOK_APP_SECRET": "app-secret-1",
    "PIPELINE_WEBHOOK_VERIFY_TOKEN": "verify-token-2",
    "PIPELINE_EVOLUTION_APIKEY": "evolution-key-3",
    "PIPELINE_RESOLVE_TOKEN": "resolve-token-4",
    "PIPELINE_RESPONDER_GPT_4O_API_KEY": "sk-responder-5",
    "PIPELINE_CONSOLE_TOKEN": "console-token-9",
}
GPT = {"kind": "openai", "url": "https://api.example.com/v1/chat/completions", "model": "m"}


def test_env_overrides_the_file() -> None:
    data = with_acme({"database": {"dsn": "postgresql://file"}, "responders": {"gpt-4o": GPT}})
    cfg = parse_config(data, "x.toml", ENV)
    assert cfg.database.dsn == ENV["PIPELINE_DATABASE_DSN"]
    assert cfg.webhook.app_secret == ENV["PIPELINE_WEBHOOK_APP_SECRET"]
    assert cfg.webhook.verify_token == ENV["PIPELINE_WEBHOOK_VERIFY_TOKEN"]
    assert cfg.webhook.evolution_apikey == ENV["PIPELINE_EVOLUTION_APIKEY"]
    assert cfg.webhook.resolve_token == ENV["PIPELINE_RESOLVE_TOKEN"]
    assert cfg.responders["gpt-4o"].api_key == ENV["PIPELINE_RESPONDER_GPT_4O_API_KEY"]


def test_env_applies_to_the_embedded_default_and_may_be_empty() -> None:
    cfg = load_config(None, env={"PIPELINE_DATABASE_DSN": "postgresql://x"})
    assert cfg.database.dsn == "postgresql://x"
    cfg = parse_config(with_acme({"database": {"dsn": "postgresql://file"}}), "x.toml",
                       {"PIPELINE_DATABASE_DSN": ""})
    assert cfg.database.dsn == ""


def test_env_is_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPELINE_RESOLVE_TOKEN", "from-os")
    assert load_config(EXAMPLE).webhook.resolve_token == "from-os"
    assert load_config(EXAMPLE, env={}).webhook.resolve_token == ""


def test_env_replaces_a_bad_file_value_but_not_other_problems() -> None:
    problems = problems_of(with_acme({"database": {"dsn": 5, "pool_size": 0}}),
                           {"PIPELINE_DATABASE_DSN": "postgresql://x"})
    assert problems == ["x.toml: [database] pool_size must be an integer >= 1, not 0"]


# --- redaction --------------------------------------------------------------------------------

def test_redacted_hides_every_secret() -> None:
    secret_keys = {(r.table, r.key) for r in reference() if r.secret}
    assert len(secret_keys) == 10
    data = with_acme({
        "dispatch": {"api_key": "dispatch-key-6"},
        "responders": {"gpt-4o": GPT},
    })
    data["instances"] = [{"name": "acme", "webhook_secret": "hmac-key-7",
                          "api_key": "number-token-8"}]
    cfg = parse_config(data, "x.toml", ENV)
    plain = redacted(cfg)
    text = json.dumps(plain)  # plain data all the way down
    for value in [*ENV.values(), "dispatch-key-6", "hmac-key-7", "number-token-8", "hunter2"]:
        assert value not in text
    assert plain["database"]["dsn"] == "***"
    assert {plain["webhook"][k] for k in ("app_secret", "verify_token", "evolution_apikey",
                                          "resolve_token")} == {"***"}
    assert plain["responders"]["gpt-4o"]["api_key"] == "***"
    assert plain["dispatch"]["api_key"] == "***"
    assert plain["console"]["token"] == "***"
    assert plain["instances"][0]["webhook_secret"] == "***"
    assert plain["instances"][0]["api_key"] == "***"
    assert plain["responders"]["rules"]["api_key"] == ""  # unset: nothing to hide
    assert plain["pipeline"]["channel_capacity"] == 16
    assert "instance_by_phone_number_id" not in plain


# --- fuzzing ----------------------------------------------------------------------------------

KNOWN_KEYS = sorted({part for r in reference() for part in
                     [*r.table.strip("[]").split("."), *r.key.split("[].")]
                     if not part.startswith("<")} | set(LOADS) | {"faq", "gpt", "rules"})
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**1100, max_value=2**1100),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["openai", "rules", "dry", "evolution", "https://x", "INFO", "acme"]),
    st.datetimes(),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)), max_leaves=25)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_any_document_gives_a_config_or_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = parse_config(data, "fuzz.toml", {})
    except ConfigError as exc:
        assert exc.problems
        assert all(p.startswith("fuzz.toml: ") for p in exc.problems)
    else:
        assert isinstance(cfg, Config)
        json.dumps(redacted(cfg))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([r for r in reference()]), VALUES)
def test_any_value_of_any_key_gives_a_config_or_config_error(row: Any, value: Any) -> None:
    data: dict[str, Any] = {"instances": [{"name": "acme"}]}
    path = [p.strip("<>") for p in row.table.strip("[]").split(".")]
    if row.table.startswith("[["):
        table = data["instances"][0]
    else:
        table = data
        for part in path:
            table = table.setdefault({"load": "history", "responder": "rules"}.get(part, part),
                                     {})
    if "[]." in row.key:
        array, key = row.key.split("[].")
        table[array] = [{"match": "a", "reply": "b", key: value}]
    else:
        table[row.key] = value
    try:
        parse_config(data, "fuzz.toml", {})
    except ConfigError as exc:
        assert exc.problems


def test_each_instance_may_have_its_own_channel() -> None:
    data = with_acme({"dispatch": {"transport": "evolution", "base_url": "http://127.0.0.1:1",
                                   "api_key": "shared"}})
    data["instances"] = [
        {"name": "acme"},
        {"name": "cloud-2", "phone_number_id": "22", "transport": "cloud-api",
         "base_url": "http://127.0.0.1:2/v21.0"},
        {"name": "quiet", "transport": "dry"},
    ]
    cfg = parse_config(data, "x.toml", {"PIPELINE_INSTANCE_CLOUD_2_API_KEY": "token-2"})
    channels = {i.name: i.channel(cfg.dispatch) for i in cfg.instances}
    assert (channels["acme"].transport, channels["acme"].api_key) == ("evolution", "shared")
    assert channels["cloud-2"].transport == "cloud-api"
    assert channels["cloud-2"].base_url == "http://127.0.0.1:2/v21.0"
    assert channels["cloud-2"].api_key == "token-2"  # the instance's environment override
    assert channels["quiet"].transport == "dry"
    data["instances"][1].pop("base_url")
    data["dispatch"] = {"transport": "dry"}
    with pytest.raises(ConfigError) as err:
        parse_config(data, "x.toml", {})
    assert str(err.value).splitlines()[-1].strip() == (
        "x.toml: [[instances]][1] base_url is required when transport = 'cloud-api' "
        "(here or in [dispatch])")
