"""Disaggregated == colocated, exactly, at the prefill→decode handoff (and a local prefill on the
disaggregated decode instance, conditional disaggregation, == colocated): token ids, the streamed text
deltas, finish_reason and usage, for random prompts (multi-byte characters included), stop strings
(drawn so that many begin inside the first, prefill-sampled token's text), max_tokens and seeds.

No Ray: in-process workers over the loopback transport, a tiny random-weight Llama that carries
SmolLM2's real byte-level BPE tokenizer (so characters split across tokens and spaces merged into
tokens behave as in serving).
"""

from __future__ import annotations

import itertools
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.config import EngineConfig, KVTransferConfig
from pdserve.decode.scheduler import DecodeOptions
from pdserve.decode.worker import DecodeWorker
from pdserve.engine.engine import Engine
from pdserve.engine.request import Request, append_token
from pdserve.kvtransfer.factories import make_receiver, make_sender
from pdserve.prefill.worker import PrefillWorker
from pdserve.types import GenerateRequest, RequestId, SamplingParams, StepOutput
from tests.conftest import TINY
from tests.net import LOCAL

_ids = itertools.count()
ALPHABET = st.sampled_from(list("ab cdé ñü€中文😀🎉👩\u200d💻\nßア"))


@dataclass(frozen=True)
class Result:
    deltas: tuple[tuple[tuple[int, ...], str, str | None], ...]  # per streamed output: ids, text, finish

    @property
    def token_ids(self) -> list[int]:
        return [t for ids, _, _ in self.deltas for t in ids]

    @property
    def text(self) -> str:
        return "".join(text for _, text, _ in self.deltas)

    @property
    def finish_reason(self) -> str | None:
        return self.deltas[-1][2]


class Deployment:
    """One colocated worker, and one prefill + one decode worker joined by a loopback transport."""

    def __init__(self, model: Path) -> None:
        cfg = EngineConfig(device="cpu", block_size=8, kv_cache_memory_gb=0.02, max_model_len=256)
        self.colocated = DecodeWorker(Engine.from_config(str(model), cfg), DecodeOptions("prefill_priority", 16, 2048))
        pe, de = Engine.from_config(str(model), cfg), Engine.from_config(str(model), cfg)
        kv = KVTransferConfig(transport="loopback", codec="raw", timeout_s=10)
        self.sender, self.receiver = make_sender(kv, pe.pool, pe.allocator, listen=LOCAL), make_receiver(kv, de.pool, listen=LOCAL)
        self.prefill = PrefillWorker(pe, 16, 2048, self.sender)
        self.decode = DecodeWorker(de, DecodeOptions("decode", 16, 2048), receiver=self.receiver)
        self.tokenizer = pe.tokenizer

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()

    def run_colocated(self, prompt: list[int], params: SamplingParams) -> Result:
        req = GenerateRequest(RequestId(f"c{next(_ids)}"), tuple(prompt), params)
        self.colocated.submit(req)
        return Result(tuple(_delta(o) for o in _drain(self.colocated)))

    def run_local(self, prompt: list[int], params: SamplingParams) -> Result:
        """Conditional disaggregation's local prefill: the disaggregated decode worker computes the
        prompt itself (no KV handle, `local_prefill`), as the router dispatches a short prompt."""
        req = GenerateRequest(RequestId(f"l{next(_ids)}"), tuple(prompt), params, local_prefill=True)
        self.decode.submit(req)
        outs = _drain(self.decode)
        assert self.decode.engine.allocator.num_used == 0, "decode kept the KV"
        return Result(tuple(_delta(o) for o in outs))

    def run_disaggregated(self, prompt: list[int], params: SamplingParams, layerwise: bool = False) -> Result:
        """`layerwise`: as the router streams a handoff: decode gets the request with the handle
        before prefill's forward and the first token after it (aborted if it ended there)."""
        req = GenerateRequest(RequestId(f"d{next(_ids)}"), tuple(prompt), params)
        self.prefill.submit(req)
        if layerwise:
            self.prefill.stream_exports(lambda handles: self.decode.submit(req, handles[0]))
        try:
            (res,) = self.prefill.step()
        finally:
            self.prefill.on_export = None
        outs = [res.first]
        if layerwise and res.first.finished:
            assert self.decode.abort(req.request_id)
        elif layerwise:
            assert self.decode.first_token(req.request_id, res.first.token_ids)
            outs += _drain(self.decode)
        elif not res.first.finished:
            self.decode.submit(GenerateRequest(req.request_id, req.prompt_token_ids, params,
                                               output_token_ids=res.first.token_ids), res.handle)
            outs += _drain(self.decode)
        deadline = time.monotonic() + 10
        while self.prefill.engine.allocator.num_used and time.monotonic() < deadline:
            self.prefill.step()  # serves the release the receiver sent
            time.sleep(0.001)
        assert self.prefill.engine.allocator.num_used == 0, "prefill kept the KV"
        assert self.decode.engine.allocator.num_used == 0, "decode kept the KV"
        return Result(tuple(_delta(o) for o in outs))


def _drain(worker: DecodeWorker) -> list[StepOutput]:
    outs: list[StepOutput] = []
    deadline = time.monotonic() + 30
    while worker.has_work():
        assert time.monotonic() < deadline, "the worker never finished"
        outs += worker.step()
    return outs


def _delta(o: StepOutput) -> tuple[tuple[int, ...], str, str | None]:
    assert o.error is None, o.error
    return tuple(o.token_ids), o.text, o.finish_reason


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Deployment:
    """A 2-layer random Llama with SmolLM2's vocabulary and tokenizer files."""
    out = tmp_path_factory.mktemp("tiny_tokenized")
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY, "vocab_size": 49152}, rope_theta=10000.0, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(config).to(torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_dir / name, out / name)
    d = Deployment(out)
    yield d
    d.close()


def _check_equal(d: Deployment, prompt: list[int], params: SamplingParams) -> Result:
    colocated = d.run_colocated(prompt, params)
    for layerwise in (False, True):
        disaggregated = d.run_disaggregated(prompt, params, layerwise)
        assert disaggregated.deltas == colocated.deltas  # ids, text and finish reason of every streamed delta
        usage = (len(prompt), len(colocated.token_ids))
        assert (len(prompt), len(disaggregated.token_ids)) == usage
    assert d.run_local(prompt, params).deltas == colocated.deltas  # conditional disaggregation, prefilled locally
    return colocated


@st.composite
def cases(draw: st.DrawFn) -> tuple[str, SamplingParams]:
    text = draw(st.text(ALPHABET, min_size=1, max_size=24))
    temperature = draw(st.sampled_from([0.0, 0.8, 1.5, 4.0]))
    seed = draw(st.integers(0, 2**31)) if temperature else None  # unseeded sampling differs run to run
    params = SamplingParams(temperature=temperature, seed=seed,
                            max_tokens=draw(st.integers(1, 10)), ignore_eos=draw(st.booleans()))
    return text, params


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(case=cases(), data=st.data())
def test_disaggregated_equals_colocated(deployment: Deployment, case: tuple, data: st.DataObject) -> None:
    text, params = case
    prompt = deployment.tokenizer.encode(text)
    free = deployment.run_colocated(prompt, params.replace(stop=()))
    # stop strings cut from the unconstrained output, starting inside the first token's text (or
    # just after it), plus an arbitrary one
    full = free.text
    first_len = len(deployment.tokenizer.decode([free.token_ids[0]])) if free.token_ids else 0
    stops: list[str] = []
    if full:
        start = data.draw(st.integers(0, min(len(full) - 1, max(first_len, 1))))
        stops.append(full[start:start + data.draw(st.integers(1, 4))])
    stops.append(data.draw(st.text(ALPHABET, min_size=1, max_size=3)))
    _check_equal(deployment, prompt, params.replace(stop=tuple(s for s in stops if s)))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(ALPHABET, min_size=1, max_size=16), data=st.data())
def test_handoff_of_any_token_sequence(deployment: Deployment, text: str, data: st.DataObject) -> None:
    """The stop and length rules and the detokenizer at the handoff, for token sequences a random
    model rarely samples: the tokens of real text (an emoji is several byte tokens, so characters
    split at the handoff often), fed through `append_token` (what both schedulers' `update` runs)
    as if sampled, with each engine's EOS ids and length. Colocated: one engine appends all;
    disaggregated: the prefill engine appends the first, the decode engine takes the request with
    it (as the router hands it over) and appends the rest."""
    tok = deployment.tokenizer
    prompt, outputs = tok.encode(data.draw(st.text(ALPHABET, min_size=1, max_size=8))), tok.encode(text)
    start = data.draw(st.integers(0, len(text) - 1))
    stop = (text[start:start + data.draw(st.integers(1, 3))],) if data.draw(st.booleans()) else ()
    params = SamplingParams(temperature=0.0, max_tokens=data.draw(st.integers(1, len(outputs) + 1)), stop=stop,
                            ignore_eos=True)
    colocated = deployment.colocated.engine
    r = colocated.add_request(GenerateRequest(RequestId("c"), tuple(prompt), params))
    expected = _append_all(colocated, r, outputs)
    first = deployment.prefill.engine
    r = first.add_request(GenerateRequest(RequestId("d"), tuple(prompt), params))
    got = _append_all(first, r, outputs[:1])
    if not r.finished:
        second = deployment.decode.engine
        r = second.add_request(GenerateRequest(RequestId("d"), tuple(prompt), params, output_token_ids=tuple(outputs[:1])))
        got += _append_all(second, r, outputs[1:])
    assert got == expected


def _append_all(engine: Engine, r: Request, tokens: list[int]) -> list[tuple[tuple[int, ...], str, str | None]]:
    out = []
    for t in tokens:
        out.append(_delta(append_token(r, t, engine.eos_token_ids, engine.max_model_len)))
        if r.finished:
            break
    return out
