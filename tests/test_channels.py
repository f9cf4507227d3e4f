"""Every number replies through its own channel: a deployment that receives on the Cloud API
and on Evolution answers each through its own API, base URL and key (local fake servers)."""

from __future__ import annotations

from pathlib import Path

import attrs
from test_replay import config_on
from test_replay_http import CountingServer, serving

from pipeline.cli import sample_log
from pipeline.pgcluster import Cluster
from pipeline.replay import replay


async def test_a_mixed_deployment_replies_through_each_numbers_api(cluster: Cluster,
                                                                   tmp_path: Path) -> None:
    async with serving(CountingServer()) as cloud, serving(CountingServer()) as evolution:
        cfg = config_on(cluster, tmp_path)
        channels = {"demo": {"transport": "cloud-api", "base_url": f"{cloud.url}/v21.0",
                             "api_key": "token-of-demo"},
                    "loja": {"transport": "evolution", "base_url": evolution.url,
                             "api_key": "apikey-of-loja"}}
        cfg = attrs.evolve(cfg, instances=tuple(attrs.evolve(i, **channels[i.name])
                                                for i in cfg.instances))
        assert cfg.dispatch.transport == "dry"  # nothing global: each number its own
        result = await replay(cfg, [sample_log()], send=True)
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
