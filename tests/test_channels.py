"""Every number replies through its own channel: a deployment that receives on the Cloud API
and on Evolution answers each through its own API, base URL and key (local fake servers)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import attrs
from test_replay import config_on
from test_replay_http import CountingServer, serving
from test_replay_logs import shifted, time_of, write_log

from pipeline.cli import sample_log
from pipeline.pgcluster import Cluster
from pipeline.replay import replay


def recent_sample(tmp_path: Path) -> Path:
    """The sample log moved to end now: its users wrote within the 24-hour window."""
    lines = sample_log().read_text("utf-8").splitlines()
    shift = dt.datetime.now(dt.UTC) - max(time_of(line) for line in lines)
    return write_log(tmp_path / "recent.jsonl",
                     [shifted(line, shift) if time_of(line).year > 1 else line
                      for line in lines])


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
    answered = {name: replies[(name, "replied")] + replies[(name, "escalated")]
                for name in ("demo", "loja")}
    assert answered == {"demo": 33 + 3, "loja": 26 + 2}  # the sample's replies, hand-overs
    for name in ("demo", "loja"):  # one send per reply or hand-over message
        assert sent[name] >= answered[name], (name, sent, answered)
