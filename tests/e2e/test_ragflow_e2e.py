"""Replay the requests RAGFlow sends when a model is saved (docs/ragflow-requests.json)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.e2e

SPEC = json.loads((Path(__file__).resolve().parents[2] / "docs" / "ragflow-requests.json").read_text())


@pytest.mark.parametrize("check", SPEC["checks"], ids=[c["name"] for c in SPEC["checks"]])
def test_ragflow_save_check(demo_server: str, check: dict[str, Any]) -> None:
    for path in [check["path"], *check.get("alternate_paths", [])]:
        t0 = time.monotonic()
        if check["name"] == "chat":
            with httpx.stream("POST", demo_server + path, json=check["body"], timeout=SPEC["timeout_s"]) as r:
                assert r.status_code == 200
                assert r.headers["content-type"].startswith("text/event-stream")
                lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            deltas = [json.loads(ln[6:])["choices"] for ln in lines[:-1]]
            text = "".join(
                (c[0]["delta"].get("content") or "") + (c[0]["delta"].get("reasoning_content") or "")
                for c in deltas
                if c
            )
            assert text.strip() and "**ERROR**" not in text
        else:
            r = httpx.post(demo_server + path, json=check["body"], timeout=SPEC["timeout_s"])
            assert r.status_code == 200, r.text
            body = r.json()
            if check["name"] == "embedding":
                vec = body["data"][0]["embedding"]
                assert len(vec) > 0 and all(isinstance(x, float) for x in vec)
                assert body["usage"]["total_tokens"] > 0
            else:
                results = body["results"]
                n_docs = len(check["body"]["documents"])
                assert sorted(x["index"] for x in results) == list(range(n_docs))[: len(results)]
                assert len(results) == min(n_docs, check["body"].get("top_n", n_docs))
                assert all(0.0 <= x["relevance_score"] <= 1.0 for x in results)
                assert body["usage"]["total_tokens"] > 0
        assert time.monotonic() - t0 < SPEC["timeout_s"]
