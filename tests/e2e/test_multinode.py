"""pdserve across a machine boundary: a two-node Ray cluster built from network namespaces
(tests/e2e/netns.py), prefill pinned to node A and decode to node B by custom resources, as
cluster.yaml's node types do. `pdserve serve --address HEAD:PORT` runs in node A's namespace and
the official OpenAI client talks to it from there. Each node has only its own loopback, so an
endpoint that advertises 127.0.0.1, or a router that lands on node B, fails here."""

from __future__ import annotations

import re
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.netns import NetnsCluster, _enter_netns, available, wait_for_line
from tests.e2e.netns import serve as _serve

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(1200)]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 16
PORT = 18080  # inside node A's namespace: no other process on the machine shares its ports
READY_S = 600.0  # model loads on a shared 2-core box
STORY_TOKENS = 300  # long enough that a node dies mid-stream; 6 fit node A's KV cache after the failover


def _config(transport: str, **kvtransfer: Any) -> dict[str, Any]:
    return {"model": "smollm2-135m", "engine": {"kv_cache_memory_gb": 0.1, "max_model_len": 512},
            "prefill": {"resources": {"node_a": 0.01}}, "decode": {"resources": {"node_b": 0.01}},
            "kvtransfer": {"transport": transport, "timeout_s": 30, **kvtransfer}, "router": {"port": PORT}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[NetnsCluster]:
    why = available()
    if why is not None:
        pytest.skip(why)
    with NetnsCluster(["node_a", "node_b"], shared={"decode_slot": 1}) as c:  # decode_slot: one per node
        yield c


@pytest.fixture(scope="module")
def greedy() -> Any:
    """prompts, max_tokens -> {prompt: the offline engine's greedy text} (the oracle, loaded once)."""
    from pdserve import LLM, SamplingParams

    llm = LLM("smollm2-135m", num_threads=1)

    def run(prompts: list[str], max_tokens: int) -> dict[str, str]:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        return {p: o.text for p, o in zip(prompts, outs)}

    return run


@pytest.fixture(scope="module")
def reference(greedy: Any) -> dict[str, str]:
    return greedy(PROMPTS, MAX_TOKENS)


def _metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _pulls(m: dict[Any, float], outcome: str) -> float:
    return sum(v for (name, labels), v in m.items() if name == "pdserve_kv_pulls_total" and ("outcome", outcome) in labels)


def _gauge(m: dict[Any, float], name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in m.items() if n == name and set(labels.items()) <= set(ls))


def _stream(url: str, prompt: str, max_tokens: int) -> tuple[str, dict[str, float]]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=240)
    text, timings = "", {}
    for chunk in client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=max_tokens,
                                           temperature=0.0, stream=True, extra_body={"ignore_eos": True}):
        text += "".join(c.text for c in chunk.choices)
        timings = (chunk.model_extra or {}).get("pdserve_timings", timings)
    return text, timings


def _generate_and_check(url: str, reference: dict[str, str]) -> list[dict[str, float]]:
    """Every prompt, streamed and not: the offline engine's greedy text. Returns the streamed timings."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    timings = []
    for prompt in PROMPTS:
        resp = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS,
                                         temperature=0.0, extra_body={"ignore_eos": True})
        assert resp.choices[0].text == reference[prompt]
        assert resp.usage.completion_tokens == MAX_TOKENS
        text, t = _stream(url, prompt, MAX_TOKENS)
        assert text == reference[prompt] and t, t
        timings.append(t)
    return timings


def _wait_metrics(node_a: Any, url: str, until: Any, timeout_s: float = 15) -> dict[Any, float]:
    """/metrics once `until(metrics)` holds (instance counters come with the router's stats poll)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = node_a.submit(_metrics, url).result()
        if until(m) or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def _wait_for_pulls(node_a: Any, url: str, n: int) -> dict[Any, float]:
    return _wait_metrics(node_a, url, lambda m: _pulls(m, "ok") >= n)


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_kv_crosses_nodes_and_the_client_gets_the_offline_tokens(
        cluster: NetnsCluster, reference: dict[str, str], transport: str, tmp_path: Path) -> None:
    """Prefill on node A, decode on node B: exact greedy text, and the counters prove the KV crossed
    (pulls ok, bytes moved, nothing recomputed). The torch run also exposes the API with --host 0.0.0.0."""
    host_args = ["--host", "0.0.0.0"] if transport == "torch" else []
    with _serve(cluster, _config(transport), tmp_path, *host_args) as (proc, log):
        url = wait_for_line(log, r"ready at (http://\S+)", proc, READY_S).group(1)
        node_a, node_b = (cluster.executor(n) for n in cluster.nodes)
        if transport == "torch":
            assert url == f"http://{cluster.head.ip}:{PORT}"  # the node's address, not 0.0.0.0
            assert node_b.submit(lambda: httpx.get(f"{url}/health", timeout=10).status_code).result() == 200
        else:
            assert url == f"http://127.0.0.1:{PORT}"  # router.host on the node where serve runs
            with pytest.raises(httpx.ConnectError):  # ... and not on node B
                node_b.submit(lambda: httpx.get(f"{url}/health", timeout=5)).result()
        timings = node_a.submit(_generate_and_check, url, reference).result()
        assert len(timings) == len(PROMPTS)
        assert all(t["transfer_bytes"] > 0 and "kv_recomputed" not in t for t in timings), timings
        m = _wait_for_pulls(node_a, url, 2 * len(PROMPTS))
        assert _pulls(m, "ok") >= 2 * len(PROMPTS)
        assert _pulls(m, "failed") == _pulls(m, "timed_out") == _pulls(m, "recomputed") == 0
        assert m[("pdserve_kv_transfer_bytes_total", ())] >= sum(t["transfer_bytes"] for t in timings) > 0


def test_tp3_prefill_on_node_a_feeds_tp1_decode_on_node_b(
        cluster: NetnsCluster, reference: dict[str, str], tmp_path: Path) -> None:
    """Resharding across the network: decode pulls each prefill rank's kv heads from that rank's own
    endpoint. (SmolLM2-135M has 9 heads and 3 kv heads: tp 3 is its smallest multi-rank split.)
    The config also names node B for the router (`router.node_ip`): the API is served from there."""
    cfg = _config("grpc")
    cfg["prefill"] = {**cfg["prefill"], "tp": 3, "num_cpus": 0.5}
    cfg["router"] = {**cfg["router"], "host": "0.0.0.0", "node_ip": cluster.nodes[1].ip}
    with _serve(cluster, cfg, tmp_path) as (proc, log):
        url = wait_for_line(log, r"ready at (http://\S+)", proc, READY_S).group(1)
        assert url == f"http://{cluster.nodes[1].ip}:{PORT}"
        node_a = cluster.executor(cluster.head)
        timings = node_a.submit(_generate_and_check, url, reference).result()
        assert all(t["transfer_bytes"] > 0 and "kv_recomputed" not in t for t in timings), timings
        m = _wait_for_pulls(node_a, url, 2 * len(PROMPTS))
        assert _pulls(m, "ok") >= 2 * len(PROMPTS) and _pulls(m, "recomputed") == 0


@pytest.mark.parametrize("transport", ["grpc", "torch"])
def test_unreachable_kv_endpoint_fails_launch_naming_address_and_port(
        cluster: NetnsCluster, tmp_path: Path, transport: str) -> None:
    """KV endpoints advertise an address nothing answers on (as behind a NAT or a wrong interface):
    the launch check fails `pdserve serve` with the address and the port, not a silent recompute.
    Decode dials prefill's endpoints; with torch, prefill also dials decode's rendezvous port."""
    cfg = _config(transport, advertise_host="10.213.0.99", port_range="31000-31099", connect_timeout_s=3)
    with _serve(cluster, cfg, tmp_path) as (proc, log):
        code = proc.wait(READY_S)
    out = log.read_text()
    assert code == 1, out[-3000:]
    assert "ready at" not in out
    expected = [r"prefill-0's KV control endpoint 10\.213\.0\.99 port (\d+) \(on node 10\.213\.0\.1\) is unreachable"]
    if transport == "torch":
        expected.append(r"decode-0's KV rendezvous endpoint 10\.213\.0\.99 port (\d+) \(on node 10\.213\.0\.2\)")
    for pattern in expected:
        m = re.search(pattern, out)
        assert m is not None, (pattern, out[-3000:])
        assert 31000 <= int(m.group(1)) <= 31099  # kvtransfer.port_range is honoured


def test_unplaceable_pool_is_reported_within_seconds(cluster: NetnsCluster, tmp_path: Path) -> None:
    cfg = {**_config("grpc"), "decode": {"resources": {"node_c": 1}}}
    started = time.monotonic()
    with _serve(cluster, cfg, tmp_path, "--placement-timeout", "10") as (proc, log):
        code = proc.wait(60)
    out = log.read_text()
    assert code == 1 and time.monotonic() - started < 40, out[-3000:]
    assert "no node can hold one decode instance ({CPU: 1, node_c: 1} on one node)" in out, out[-3000:]
    assert "node 10.213.0.2 has {CPU: 2, decode_slot: 1, node_b: 1}" in out


LONG = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 30)  # ~400 tokens


def test_a_partition_longer_than_the_transfer_timeout_mid_pull_hangs_nothing(
        cluster: NetnsCluster, greedy: Any, tmp_path: Path) -> None:
    """The link to node B is throttled so a pull takes far longer than the 4 s transfer timeout,
    then cut for 8 s mid-pull: the pull ends as a value (timed out / failed, counted), decode
    recomputes, the client gets the exact greedy text, and once the lease ran out the prefill
    instance's blocks are all free again."""
    if shutil.which("tc") is None:
        pytest.skip("iproute2's `tc` is not installed (it throttles the link)")
    want = greedy([LONG], 4)[LONG]
    cfg = _config("grpc", timeout_s=4, lease_s=6)
    node_b = cluster.nodes[1]
    with _serve(cluster, cfg, tmp_path) as (proc, log):
        url = wait_for_line(log, r"ready at (http://\S+)", proc, READY_S).group(1)
        node_a = cluster.executor(cluster.head)
        assert node_a.submit(_stream, url, "Hello", 2).result()[1]["transfer_bytes"] > 0  # warm, healthy
        try:
            cluster.throttle(node_b, "2mbit")  # ~20 MB of KV: minutes at this rate
            started = time.monotonic()
            future = node_a.submit(_stream, url, LONG, 4)
            time.sleep(2.5)  # prefill (~1 s here) is done and decode is pulling
            cluster.link(node_b, up=False)
            time.sleep(8)
        finally:
            cluster.link(node_b, up=True)
            cluster.throttle(node_b, None)
        text, timings = future.result(timeout=180)  # no hang
        assert text == want and timings.get("kv_recomputed") == 1.0, timings
        assert time.monotonic() - started < 180
        m = _wait_metrics(node_a, url, lambda m: _pulls(m, "recomputed") >= 1)
        assert _pulls(m, "timed_out") + _pulls(m, "failed") >= 1 and _pulls(m, "recomputed") >= 1
        m = _wait_metrics(node_a, url, lambda m: _gauge(m, "pdserve_instance_kv_usage_ratio", role="prefill") == 0,
                          timeout_s=60)  # the lease (6 s), then the router's stats poll
        assert _gauge(m, "pdserve_instance_kv_usage_ratio", role="prefill") == 0


def test_decode_node_death_under_live_streams_then_the_node_rejoins(
        cluster: NetnsCluster, greedy: Any, tmp_path: Path) -> None:
    """Two decode instances, one per node. Every process of node B is killed under 6 live streams:
    each stream ends with its exact greedy text (re-dispatched to node A's instance, which
    recomputes prompt + streamed tokens) or an explicit error, none hangs. Node B comes back
    (`ray start` again) and its instance, restarted there by Ray, serves again without
    restarting `pdserve serve`."""
    prompts = [f"Write a long story about a {w}." for w in ("cat", "dog", "ship", "tree", "river", "robot")]
    want = greedy(prompts, STORY_TOKENS)
    cfg = _config("grpc")
    cfg["decode"] = {"instances": 2, "resources": {"decode_slot": 1}}
    node_b = cluster.nodes[1]
    with _serve(cluster, cfg, tmp_path) as (proc, log):
        url = wait_for_line(log, r"ready at (http://\S+)", proc, READY_S).group(1)
        clients = ThreadPoolExecutor(len(prompts), initializer=_enter_netns, initargs=(cluster.head.ns,))
        decoding = {p: threading.Event() for p in prompts}
        futures = {p: clients.submit(_stream_or_error, url, p, STORY_TOKENS, decoding[p]) for p in prompts}
        assert all(e.wait(120) for e in decoding.values())  # every stream is decoding (tokens after the first)
        assert not any(f.done() for f in futures.values())
        assert cluster.stop_node(node_b)
        results = {p: f.result(timeout=300) for p, f in futures.items()}  # none hangs
        for p, (text, error) in results.items():
            assert (error is None and text == want[p]) or (error is not None and want[p].startswith(text)), (p, text, error)
        assert sum(e is None for _, e in results.values()) >= len(prompts) // 2, results
        node_a = cluster.executor(cluster.head)
        m = node_a.submit(_metrics, url).result()
        dead = [ls for (n, ls), v in m.items() if n == "pdserve_instance_healthy" and ("role", "decode") in ls
                and v == 0]
        assert len(dead) == 1, m
        instance = dict(dead[0])["instance"]
        cluster.start_ray(node_b)  # the node rejoins; Ray restarts the dead instance there
        deadline = time.monotonic() + READY_S
        while _gauge(m, "pdserve_instance_healthy", instance=instance) != 1 and time.monotonic() < deadline:
            time.sleep(2)
            m = node_a.submit(_metrics, url).result()
        assert _gauge(m, "pdserve_instance_healthy", instance=instance) == 1
        again = list(clients.map(lambda p: _stream_or_error(url, p, 8), prompts))
        assert all(e is None and want[p].startswith(t) for p, (t, e) in zip(prompts, again)), again
        time.sleep(2)
        m = node_a.submit(_metrics, url).result()
        assert _gauge(m, "pdserve_instance_engine_steps_total", instance=instance) > 0  # it served again


def _stream_or_error(url: str, prompt: str, max_tokens: int,
                     decoding: threading.Event | None = None) -> tuple[str, str | None]:
    """The streamed text, and the error that ended the stream (None when it finished). `decoding`
    is set once a few tokens after the first have arrived."""
    import openai

    text, chunks = "", 0
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=240)
        for chunk in client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=max_tokens,
                                               temperature=0.0, stream=True, extra_body={"ignore_eos": True}):
            text += "".join(c.text for c in chunk.choices)
            chunks += 1
            if decoding is not None and chunks >= 4:
                decoding.set()
            for c in chunk.choices:
                if c.finish_reason == "error":
                    return text, "finish_reason=error"
    except openai.APIError as e:
        return text, f"{type(e).__name__}: {e}"
    return text, None
