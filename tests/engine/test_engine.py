"""LLMEngine / EngineLoop on CPU with a tiny random Llama (and SmolLM2 for eos / stop)."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_fixtures import SMOL_DIR
from safetensors.torch import load_file, save_file

from slora_backend import (
    EngineConfig,
    EngineError,
    EngineLoop,
    ErrorCode,
    LLMEngine,
    RequestOutput,
    SamplingParams,
)

GREEDY = dict(temperature=0.0, ignore_eos=True)
ADAPTER_WAIT_STEPS = 40  # max_tokens=50: both requests are still running by then
MIB = 1 << 20
COLD_LOAD_MAX_STEPS = 200  # 1 s of the engine's 5-ms waits; the load itself takes milliseconds


def make_engine(model_dir: Path, adapter_dir: Path, **kw: object) -> LLMEngine:
    cfg = dict(model=str(model_dir), adapter_dir=str(adapter_dir), dtype="float32",
               device="cpu", pool_bytes=16 * MIB)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def drain(engine: LLMEngine, max_steps: int = 1000) -> dict[str, list[RequestOutput]]:
    outs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outs
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    raise AssertionError("engine did not finish")


def tokens_of(outs: list[RequestOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path, tiny_adapter_dir: Path) -> LLMEngine:
    eng = make_engine(tiny_model_dir, tiny_adapter_dir, max_waiting=4)
    yield eng
    eng.close()


def test_add_request_validation(engine: LLMEngine) -> None:
    with pytest.raises(EngineError) as exc:
        engine.add_request("r", prompt_token_ids=[5, 6], adapter_id="no_such_adapter")
    assert exc.value.code is ErrorCode.NOT_FOUND and "no_such_adapter" in exc.value.message
    cases = [
        (dict(prompt_token_ids=[5], adapter_id="../etc"), "adapter"),
        (dict(prompt_token_ids=[5], prompt="hi"), "prompt"),
        (dict(), "prompt"),
        (dict(prompt=""), "prompt"),
        (dict(prompt_token_ids=[10**9]), "prompt_token_ids"),
        (dict(prompt_token_ids=[5] * 500, params=SamplingParams(max_tokens=100)), "max_tokens"),
    ]
    for kwargs, field in cases:
        with pytest.raises(EngineError) as exc:
            engine.add_request("r", **kwargs)
        assert exc.value.code is ErrorCode.INVALID_ARG, kwargs
        assert field in exc.value.message, (kwargs, exc.value.message)
    assert not engine.has_unfinished()  # nothing was queued by a refused request


def test_queue_full_and_duplicate_id(engine: LLMEngine) -> None:
    for i in range(4):
        engine.add_request(f"q{i}", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=2))
    with pytest.raises(EngineError) as exc:
        engine.add_request("q_extra", prompt_token_ids=[5])
    assert exc.value.code is ErrorCode.UNAVAILABLE
    with pytest.raises(EngineError, match="request_id"):
        engine.add_request("q0", prompt_token_ids=[5])
    outs = drain(engine)
    assert sorted(outs) == [f"q{i}" for i in range(4)]
    assert all(o[-1].finish_reason == "length" and len(tokens_of(o)) == 2 for o in outs.values())


def test_abort_frees_pages_at_next_step(engine: LLMEngine) -> None:
    p = SamplingParams(max_tokens=50, **GREEDY)
    engine.add_request("run", prompt_token_ids=list(range(10, 40)), params=p,
                       adapter_id="a_r8_all")
    engine.add_request("keep", prompt_token_ids=list(range(50, 60)), params=p)
    for _ in range(ADAPTER_WAIT_STEPS):  # "run" waits for its adapter's background load
        engine.step()
        if engine.stats().num_running == 2:
            break
        time.sleep(0.01)
    busy = engine.stats()
    assert busy.num_running == 2 and busy.pool_pages_kv > 0
    engine.abort("run")
    engine.abort("unknown-id")  # ignored
    outs = engine.step()
    cancelled = [o for o in outs if o.request_id == "run"]
    assert len(cancelled) == 1 and cancelled[0].finished
    assert cancelled[0].finish_reason == "cancelled"
    after = engine.stats()
    assert after.num_running == 1 and after.pool_pages_kv < busy.pool_pages_kv
    engine.abort("keep")
    drain(engine)
    final = engine.stats()
    assert final.pool_pages_kv == 0 and final.num_running == final.num_waiting == 0
    assert final.pool_pages_lora > 0 and final.adapters_resident == 1  # idle, still resident
    assert final.pool_pages_free == final.pool_pages_total - final.pool_pages_lora


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_preemption_gives_the_same_tokens(tiny_model_dir: Path, tiny_adapter_dir: Path,
                                          async_scheduling: str) -> None:
    reqs = [(f"p{i}", [100 + 7 * i + j for j in range(12)], name)
            for i, name in enumerate(["a_r4_qv", None, "a_r16_mlp", "a_r8_all", None])]
    results = []
    for pool_bytes in (16 * MIB, None):
        # tiny model: 2 layers * 1024 elems * 4 B = 8 KiB per page; 14 pages force preemption
        # once admission keeps no headroom (with it, this batch is admitted without preempting)
        kw = {"pool_bytes": 14 * 8192, "kv_headroom_tokens": 0} if pool_bytes is None \
            else {"pool_bytes": pool_bytes}
        eng = make_engine(tiny_model_dir, tiny_adapter_dir, async_scheduling=async_scheduling,
                          **kw)
        for rid, prompt, adapter in reqs:
            eng.add_request(rid, prompt_token_ids=prompt,
                            params=SamplingParams(max_tokens=40, **GREEDY), adapter_id=adapter)
        outs = drain(eng)
        results.append(({rid: tokens_of(o) for rid, o in outs.items()},
                        eng.stats().num_preemptions))
        assert eng.stats().pool_pages_kv == 0
        eng.close()
    (big, big_pre), (small, small_pre) = results
    assert big_pre == 0 and small_pre > 0
    assert small == big


def test_seeded_sampling_is_batch_independent(engine: LLMEngine) -> None:
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    engine.add_request("alone", prompt_token_ids=[11, 12, 13], params=p)
    alone = tokens_of(drain(engine)["alone"])
    engine.add_request("other", prompt_token_ids=[9] * 20, params=SamplingParams(max_tokens=8))
    engine.add_request("again", prompt_token_ids=[11, 12, 13], params=p)
    assert tokens_of(drain(engine)["again"]) == alone


def test_engine_loop_threads_abort_and_shutdown(tiny_model_dir: Path,
                                                tiny_adapter_dir: Path) -> None:
    eng = make_engine(tiny_model_dir, tiny_adapter_dir)
    got: dict[str, list[RequestOutput]] = {}
    done = threading.Event()
    lock = threading.Lock()

    def on_output(o: RequestOutput) -> None:
        with lock:
            got.setdefault(o.request_id, []).append(o)
            if sum(1 for v in got.values() if v[-1].finished) == 6:
                done.set()

    loop = EngineLoop(eng, on_output)
    loop.start()
    adapters = ["a_r4_qv", None, "a_r32_attn"]

    def submit(k: int) -> None:
        for i in range(2):
            loop.add_request(f"t{k}_{i}", prompt_token_ids=[20 + k, 30 + i, 40],
                             params=SamplingParams(max_tokens=6, **GREEDY),
                             adapter_id=adapters[k])

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert done.wait(120)
    assert all(len(tokens_of(v)) == 6 and v[-1].finish_reason == "length" for v in got.values())
    loop.add_request("long", prompt_token_ids=[5, 6, 7],
                     params=SamplingParams(max_tokens=400, **GREEDY))
    loop.shutdown()  # aborts the running request and joins
    assert got["long"][-1].finished and got["long"][-1].finish_reason == "cancelled"
    with pytest.raises(EngineError) as exc:
        loop.add_request("late", prompt_token_ids=[5])
    assert exc.value.code is ErrorCode.UNAVAILABLE
    assert eng.stats().pool_pages_kv == 0


@pytest.mark.skipif(not (SMOL_DIR / "model.safetensors").exists(), reason="SmolLM2 missing")
@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_eos_stop_strings_and_chat(tmp_path: Path, async_scheduling: str) -> None:
    eng = make_engine(SMOL_DIR, tmp_path, pool_bytes=64 * MIB, async_scheduling=async_scheduling)
    chat = [{"role": "user", "content": "Say hello in one short sentence."}]
    eng.add_request("eos", prompt=chat, params=SamplingParams(max_tokens=60, temperature=0.0))
    out = drain(eng)["eos"]
    toks, text = tokens_of(out), "".join(o.new_text for o in out)
    assert out[-1].finish_reason == "stop" and toks[-1] in eng.spec.eos_token_ids
    assert "<|im_end|>" not in text and len(text) > 3
    assert out[-1].num_output_tokens == len(toks)
    # ignore_eos: generation goes on past eos up to max_tokens
    n = len(toks) + 3
    eng.add_request("ign", prompt=chat, params=SamplingParams(max_tokens=n, temperature=0.0,
                                                               ignore_eos=True))
    ign = drain(eng)["ign"]
    assert tokens_of(ign)[:len(toks)] == toks and len(tokens_of(ign)) == n
    assert ign[-1].finish_reason == "length"
    # stop string: text ends right before it, finish_reason "stop"
    stop = text[len(text) // 2:len(text) // 2 + 3]
    eng.add_request("stop", prompt=chat, params=SamplingParams(max_tokens=60, temperature=0.0,
                                                               stop=[stop]))
    st = drain(eng)["stop"]
    st_text = "".join(o.new_text for o in st)
    assert st[-1].finish_reason == "stop"
    assert st_text == text[:text.index(stop)]
    eng.close()


def test_chat_needs_a_chat_template(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A chat prompt for a model without a chat template, or a malformed chat message, is
    INVALID_ARG naming the prompt (not an internal error); a plain prompt still works."""
    plain = tmp_path / "no_template"
    shutil.copytree(tiny_model_dir, plain)
    (plain / "chat_template.jinja").unlink()
    eng = make_engine(plain, tmp_path, pool_bytes=16 * MIB)
    for chat in ([{"role": "user", "content": "hi"}], [{"content": "no role"}]):
        with pytest.raises(EngineError) as exc:
            eng.add_request("c", prompt=chat)
        assert exc.value.code is ErrorCode.INVALID_ARG and "'prompt'" in exc.value.message
    eng.add_request("p", prompt="hi", params=SamplingParams(max_tokens=2, temperature=0.0))
    assert drain(eng)["p"][-1].finish_reason == "length"
    eng.close()


def test_adapter_failing_to_load_fails_only_its_request(tiny_model_dir: Path,
                                                        tiny_adapter_dir: Path,
                                                        tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    shutil.copytree(tiny_adapter_dir, adapters)
    weights_file = adapters / "a_r4_qv" / "adapter_model.safetensors"
    tensors = load_file(weights_file)
    first_b = next(k for k in tensors if "lora_B" in k)
    tensors[first_b][0, 0] = float("nan")  # header still valid: only the full load sees it
    save_file(tensors, weights_file)
    eng = make_engine(tiny_model_dir, adapters)
    p = SamplingParams(max_tokens=4, **GREEDY)
    eng.add_request("bad", prompt_token_ids=[5, 6, 7], params=p, adapter_id="a_r4_qv")
    eng.add_request("good", prompt_token_ids=[5, 6, 7], params=p, adapter_id="a_r8_all")
    outs = drain(eng)
    bad = outs["bad"][-1]
    assert bad.finished and bad.error is not None and bad.error.code is ErrorCode.INVALID_ARG
    assert "a_r4_qv" in bad.error.message and not bad.new_token_ids
    assert outs["good"][-1].finish_reason == "length" and len(tokens_of(outs["good"])) == 4
    assert eng.stats().pool_pages_kv == 0
    assert torch.isfinite(eng.storage.tensor).all()  # nothing of the bad adapter was written
    eng.close()


def test_a_cold_adapter_loads_in_few_steps(tiny_model_dir: Path,
                                           tiny_adapter_dir: Path) -> None:
    """With nothing to run while its only request waits for a cold adapter, a step sleeps until
    the load ends: a loop spinning on empty steps held the GIL the loader thread needed back
    after each syscall (hundreds to thousands of empty steps per load here before)."""
    eng = make_engine(tiny_model_dir, tiny_adapter_dir, host_cache_workers=1)
    try:
        eng.add_request("cold", prompt_token_ids=[5, 6, 7], adapter_id="a_r16_mlp",
                        params=SamplingParams(max_tokens=1, **GREEDY))
        outs = drain(eng, max_steps=COLD_LOAD_MAX_STEPS)
        assert outs["cold"][-1].finish_reason == "length"
    finally:
        eng.close()


def test_dummy_load_format_needs_no_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    """load_format=dummy: random weights in the shape of config.json (benchmarks at scale);
    without it, a directory with no weights is refused naming 'model'."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_model_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, bare / f.name)
    with pytest.raises(EngineError) as exc:
        make_engine(bare, tmp_path)
    assert exc.value.code is ErrorCode.INVALID_ARG and "'model'" in exc.value.message
    eng = make_engine(bare, tmp_path, load_format="dummy")
    assert not eng.async_scheduling  # auto: off on the CPU
    assert eng.spec.hidden_size == 64 and eng.spec.num_layers == 2
    eng.add_request("d", prompt_token_ids=[5, 6, 7], params=SamplingParams(max_tokens=5, **GREEDY))
    out = drain(eng)["d"]
    assert len(tokens_of(out)) == 5 and out[-1].finish_reason == "length"
    eng.close()
