"""Every number replies through its own channel: a deployment that receives on the Cloud API
and on Evolution answers each through its own API, base URL and key (local fake servers)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import attrs
from test_replay import config_on
from test_replay_http import CountingServer, serving

from pipeline.cli import sample_log
from pipeline.pgcluster import Cluster
from pipeline.replay import replay


def recent_sample(tmp_path: Path) -> Path:
    """The sample log moved to end now: its users wrote within the 24-hour window."""
    lines = sample_log().read_text("utf-8").splitlines()
    times = [time_of(line) for line in lines]
    shift = dt.datetime.now(dt.UTC) - max(t for t in times if t is not None)
    out = []
    for line, at in zip(lines, times, strict=True):
        if at is not None:
            record = json.loads(line)
            record["received_at"] = (at + shift).isoformat()
            line = json.dumps(record, ensure_ascii=False)
        out.append(line)
    path = tmp_path / "recent.jsonl"
    path.write_text("\n".join(out) + "\n", "utf-8")
    return path


def time_of(line: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(json.loads(line)["received_at"])
    except (ValueError, KeyError, TypeError):
        return None


async def test_a_mixed_deployment_replies_through_each_numbers_api(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    async with serving(CountingServer()) as cloud, serving(CountingServer()) as evolution:
        cfg = config_on(cluster, tmp_path)
        channels = {"demo": {"transport": "cloud-api", "base_url": f"{cloud.url}/v21.0",
                             "api_key": "token-of-demo"},
                    "loja": {"transport": "evolution", "base_url": evolution.url,
                             "api_key": "apikey-of-loja"}}
        cfg = attrs.evolve(cfg, instances=tuple(attrs.evolve(i, **channels[i.name])
                                                for i in cfg.instances),
                           dispatch=attrs.evolve(cfg.dispatch, per_recipient_gap_s=0.0))
        assert cfg.dispatch.transport == "dry"  # nothing global: each number its own
        result = await replay(cfg, [recent_sample(tmp_path)], send=True)
    replies = result.sink.per_instance
    assert cloud.requests and evolution.requests
    for path, headers, body in cloud.requests:
        assert path == "/v21.0/1122334455667/messages"
        assert headers["authorization"] == "Bearer token-of-demo"
        assert body["messaging_product"] == "whatsapp" and body["text"]["body"]
    for path, headers, body in evolution.requests:
        assert path == "/message/sendText/loja"
        assert headers["apikey"] == "apikey-of-loja"
        assert body["number"] and body["text"]
    sent = {"demo": len(cloud.requests), "loja": len(evolution.requests)}
    for name in ("demo", "loja"):  # one send per reply or hand-over message
        answered = replies[(name, "replied")] + replies[(name, "escalated")]
        assert sent[name] >= answered > 0, (name, sent, answered)
