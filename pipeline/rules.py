"""The stages' rules, built from the configuration: the one place where the config schema
meets the stages (which know nothing of it and take these records instead)."""

from __future__ import annotations

import datetime as dt

from pipeline.concurrency import Backoff
from pipeline.config import (
    BusinessHoursConfig,
    Config,
    DatabaseConfig,
    EscalationConfig,
    InstanceConfig,
)
from pipeline.store import PhoneRule
from stages.escalation import BusinessHours, EscalationRules
from stages.parse import InstanceDirectory
from stages.turns import BurstRules


def business_hours(cfg: BusinessHoursConfig) -> BusinessHours:
    return BusinessHours(cfg.enabled, cfg.timezone, frozenset(cfg.days),
                         dt.time.fromisoformat(cfg.open), dt.time.fromisoformat(cfg.close))


def rules_from_config(base: EscalationConfig, instance: InstanceConfig) -> EscalationRules:
    """The rules of ``instance``: the ``[escalation]`` defaults refined by the instance."""
    return EscalationRules(
        keywords=(*base.keywords, *instance.escalation_keywords),
        max_failed_answers=instance.max_failed_answers or base.max_failed_answers,
        request_phrases=base.request_phrases,
        enabled=instance.escalation_enabled,
        hours=business_hours(base.business_hours),
        min_confidence=base.min_confidence,
    )


def escalation_rules(cfg: Config) -> dict[str, EscalationRules]:
    """Each instance's rules: the ``[escalation]`` defaults refined by the instance."""
    return {i.name: rules_from_config(cfg.escalation, i) for i in cfg.instances}


def burst_rules(cfg: Config) -> BurstRules:
    buf = cfg.intake.buffer
    return BurstRules(dt.timedelta(milliseconds=buf.window_ms), buf.max_messages,
                      dt.timedelta(milliseconds=buf.max_wait_ms) if buf.max_wait_ms else None,
                      dt.timedelta(seconds=cfg.dedupe.content_window_s))


def dry_instances(cfg: Config) -> dict[str, bool]:
    """Whether each instance's channel is ``dry`` (its outbox rows are recorded, not sent)."""
    return {i.name: i.channel(cfg.dispatch).transport == "dry" for i in cfg.instances}


def instance_directory(cfg: Config) -> InstanceDirectory:
    return InstanceDirectory(cfg.instance_by_phone_number_id, cfg.instance_by_evolution_name)


def database_retry(cfg: DatabaseConfig) -> Backoff:
    """The one budget of work waiting for an unavailable database: the turn stages, intake
    and recording what a send did all retry with it."""
    return Backoff(attempts=1_000_000, initial_s=0.1, max_s=5.0,
                   deadline_s=cfg.unavailable_retry_s)


def phone_rule(cfg: Config) -> PhoneRule:
    """What a live run does with a message typed on the business phone."""
    return "hold" if cfg.console.hold_on_phone_reply else "record"
