"""End to end: the real openai SDK through a real mitmdump running the bundle, in reverse and forward mode."""

from __future__ import annotations

import json
import ssl
import time

import httpx
import openai
import pytest

from tests.conftest import UPSTREAM_KEY

pytestmark = pytest.mark.e2e


def _assert_key_custody(received, token: str) -> None:
    assert received, "the upstream received nothing"
    for request in received:
        assert request.headers.get("authorization") == f"Bearer {UPSTREAM_KEY}"
        assert token not in json.dumps(request.headers)
        assert token.encode() not in request.body


def test_reverse_responses_json_injects_key_and_hides_token(reverse_env, upstream, callers):
    upstream.reply_text = "reverse mode works"
    client = openai.OpenAI()
    raw = client.responses.with_raw_response.create(model="gpt-test", input="hi")
    response = raw.parse()
    assert response.output_text == "reverse mode works"
    _assert_key_custody(upstream.received, callers.alice)
    assert UPSTREAM_KEY not in json.dumps(dict(raw.headers)) and UPSTREAM_KEY not in raw.http_response.text
    assert float(raw.headers["x-gateway-overhead-ms"]) >= 0


def test_reverse_chat_completions_json_and_stream(reverse_env, upstream, callers):
    upstream.reply_text = "chat says hello"
    client = openai.OpenAI()
    completion = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "chat says hello"
    stream = client.chat.completions.create(model="gpt-test", messages=[{"role": "user", "content": "hi"}], stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "chat says hello"
    _assert_key_custody(upstream.received, callers.alice)


def test_reverse_embeddings_pass(reverse_env, upstream):
    result = openai.OpenAI().embeddings.create(model="text-embedding-test", input=["abc", "de"])
    assert [len(d.embedding) for d in result.data] == [4, 4]
    assert result.data[0].embedding[0] == pytest.approx(0.3)
    assert upstream.received[-1].path.endswith("/embeddings")


@pytest.mark.parametrize("token", [None, "agt_not-a-real-token", "sk-some-other-key"])
def test_missing_or_wrong_token_is_401(reverse_env, upstream, token):
    client = openai.OpenAI(api_key=token or "placeholder", max_retries=0)
    if token is None:
        client = client.with_options(default_headers={"Authorization": ""})
    with pytest.raises(openai.AuthenticationError) as info:
        client.responses.create(model="gpt-test", input="hi")
    assert info.value.code == "gateway_unauthenticated"
    assert info.value.response.headers["content-type"] == "application/json"
    assert info.value.request_id and info.value.request_id.startswith("req_gw_")
    assert "x-gateway-overhead-ms" in info.value.response.headers
    assert upstream.received == [], "a refused request must not reach the upstream"


def test_forward_responses_over_tls_with_key_custody(forward_env, tls_upstream, callers):
    tls_upstream.reply_text = "forward mode works"
    raw = openai.OpenAI().responses.with_raw_response.create(model="gpt-test", input="hi")
    assert raw.parse().output_text == "forward mode works"
    assert "x-gateway-overhead-ms" in raw.headers
    _assert_key_custody(tls_upstream.received, callers.alice)


def test_forward_refuses_hosts_it_does_not_serve(forward_env, tls_upstream_server):
    # A CONNECT to a host that is neither an upstream nor pass-through is refused...
    with httpx.Client(proxy=forward_env.url, verify=False) as client:
        with pytest.raises(httpx.ProxyError, match="403"):
            client.get("https://example.invalid/v1/models")
        # ...and so is a plain-HTTP request through the proxy, with an OpenAI-shaped body.
        response = client.get("http://example.invalid/v1/models")
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "gateway_forbidden"


def test_forward_mitmproxys_onboarding_app_answers_nobody(forward_env, confdir):
    # mitmproxy answers http://mitm.it/ itself (its page, its CA) before any hook of the gateway runs: to
    # an unauthenticated caller, from a host that is no upstream. The gateway turns that app off.
    ca_pem = (confdir / "mitmproxy-ca-cert.pem").read_bytes()
    with httpx.Client(proxy=forward_env.url) as client:
        responses = [client.get("http://mitm.it/"), client.get("http://mitm.it/cert/pem")]
    for response in responses:
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "gateway_forbidden"
        assert ca_pem not in response.content and b"mitmproxy" not in response.content
    assert "onboarding app (mitm.it) is off" in forward_env.log()


def test_forward_passthrough_host_is_tunnelled_untouched(forward_env, callers, tls_upstream, tls_upstream_server,
                                                         tls_files):
    # 127.0.0.1:<port> is listed as pass-through: the client talks TLS with the upstream itself
    # (it must trust the upstream's own CA), and the gateway neither decrypts nor changes anything.
    # Opening the tunnel takes the caller's gateway token as proxy credentials.
    proxy = forward_env.url.replace("http://", f"http://agent:{callers.alice}@")
    with httpx.Client(proxy=proxy, verify=ssl.create_default_context(cafile=tls_files.ca_cert)) as client:
        response = client.get(f"https://127.0.0.1:{tls_upstream_server.port}/v1/models",
                              headers={"Authorization": "Bearer caller-own-credential"})
    assert response.status_code == 200
    assert tls_upstream.received[-1].headers["authorization"] == "Bearer caller-own-credential"
    assert "x-gateway-overhead-ms" not in response.headers
    assert "pass-through tunnel to 127.0.0.1" in forward_env.log()


def test_sse_events_arrive_as_they_are_sent(reverse_env, upstream):
    upstream.reply_text = "one two three four five six"
    upstream.deltas, upstream.event_delay = 6, 0.15
    client = openai.OpenAI()
    arrivals = []
    with client.responses.stream(model="gpt-test", input="hi") as stream:
        for event in stream:
            if event.type == "response.output_text.delta" and event.delta:
                arrivals.append(time.monotonic())
        final = stream.get_final_response()
    assert final.output_text == "one two three four five six"
    # Masking may hold back the word in progress, so a delta can come one event late, but never later.
    assert len(arrivals) >= 6
    gaps = [b - a for a, b in zip(arrivals[:6], arrivals[1:6])]
    # Buffered, all deltas would land together at the end; streamed, they keep the upstream's spacing.
    assert min(gaps) > 0.08, gaps
    assert arrivals[-1] - arrivals[0] > 0.6


def test_upstream_unreachable_is_openai_shaped_502(session_dir, rules_and_callers, confdir, callers):
    import socket

    from tests.conftest import gateway_env
    from tests.gateway_process import GatewayProcess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    rules, _ = rules_and_callers
    gateway = GatewayProcess(session_dir / "gw-dead", rules=rules, records=session_dir / "records-dead",
                             confdir=confdir, args=["--mode", f"reverse:http://127.0.0.1:{dead_port}"],
                             env=gateway_env()).start()
    try:
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=callers.alice, max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            client.responses.create(model="gpt-test", input="hi")
        assert info.value.status_code == 502
        assert info.value.code == "gateway_upstream_unavailable"
        assert info.value.response.headers["content-type"] == "application/json"
    finally:
        gateway.stop()
