"""Priority scheduling (--scheduling-policy priority): queue order, preemption order, /metrics, the API field."""
from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from conftest import start_api_server
from lmserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.llm_engine import LLMEngine
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Sequence
from lmserve.sampling_params import SamplingParams, SamplingParamsError

_ids = iter(range(10**9))


def make_seq(n_tokens: int, priority: int = 0, max_tokens: int = 4) -> Sequence:
    i = next(_ids)
    return Sequence(i, f"r{i}", list(range(1, n_tokens + 1)), SamplingParams(max_tokens=max_tokens, priority=priority))


def run_step(sched: Scheduler):
    out = sched.schedule()
    samplers = [s.seq for s in out.scheduled if s.samples]
    sched.update_after_step(out)
    for seq in samplers:
        seq.append_token(7)
        if seq.check_stop_token():
            sched.finish(seq)
    return out


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_urgent_request_queued_last_starts_first_with_one_slot(policy):
    bm = BlockManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, policy=policy), bm)
    busy = make_seq(8, max_tokens=3)
    sched.add(busy)
    run_step(sched)
    normal = [make_seq(8) for _ in range(10)]
    for seq in normal:
        sched.add(seq)
    urgent = make_seq(8, priority=-1)
    sched.add(urgent)
    started = []
    for _ in range(200):
        if not sched.num_unfinished:
            break
        for s in run_step(sched).scheduled:
            if s.seq is not busy and s.seq not in started:
                started.append(s.seq)
    assert len(started) == 11 and not sched.num_unfinished
    if policy == "priority":
        assert started[0] is urgent and started[1:] == normal
    else:   # fcfs ignores the field
        assert started == normal + [urgent]


def test_priority_policy_preempts_the_lowest_priority_not_the_newest():
    # 3 sequences of 4 + 6 tokens in 2-token blocks need 15 blocks; 12 usable: someone is preempted while decoding
    bm = BlockManager(13, 2, enable_prefix_caching=False)
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, policy="priority"), bm)
    low = make_seq(4, priority=5, max_tokens=6)        # oldest, least urgent
    mid = make_seq(4, priority=0, max_tokens=6)
    new = make_seq(4, priority=0, max_tokens=6)        # newest
    for seq in (low, mid, new):
        sched.add(seq)
    first_preempted = None
    for _ in range(100):
        if not sched.num_unfinished:
            break
        out = run_step(sched)
        if out.preempted and first_preempted is None:
            first_preempted = out.preempted[0]
    assert not sched.num_unfinished
    assert first_preempted is low and mid.num_preemptions == 0 and new.num_preemptions == 0
    assert all(s.num_output_tokens == 6 for s in (low, mid, new))


def test_priority_must_be_an_integer():
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(priority=1.5)
    assert e.value.param == "priority"
    with pytest.raises(ValueError, match="scheduling policy"):
        SchedulerConfig(policy="lifo")


def test_engine_preemption_under_kv_pressure_keeps_outputs_identical(tiny_models):
    """Real model, a cache too small for all: the low-priority request is preempted and recomputed, and every
    request's greedy tokens equal its solo run."""
    def engine(num_blocks):
        return LLMEngine(EngineConfig(
            # NOTE: kernels="torch": this is about preemption order; no wait for a C++ kernel build
            model=ModelConfig(model=tiny_models["llama"], dtype="float32", kernels="torch"),
            cache=CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, policy="priority")))

    prompts = [[5 + 3 * i + j for j in range(10)] for i in range(4)]
    priorities = [3, 0, 0, 1]       # the oldest request is the least urgent

    def params(p):
        return SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, priority=p)

    solo_engine = engine(64)
    solo = [solo_engine.generate([ids], params(0))[0].outputs[0].token_ids for ids in prompts]
    small = engine(25)     # 24 usable blocks of 4: the four need 4 x 9 blocks at the end
    for i, (ids, p) in enumerate(zip(prompts, priorities)):
        small.add_request(f"r{i}", ids, params(p))
    seqs = {rid: req.seqs[0] for rid, req in small.requests.items()}
    outs = {}
    while small.has_unfinished():
        for o in small.step():
            if o.finished:
                outs[o.request_id] = o.outputs[0].token_ids
    assert [outs[f"r{i}"] for i in range(4)] == solo
    assert small.scheduler.num_preemptions_total > 0
    assert seqs["r0"].num_preemptions > 0          # the priority-3 request went first
    assert seqs["r1"].num_preemptions == 0 and seqs["r2"].num_preemptions == 0


# ---- over HTTP -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def priority_server(tmp_path_factory, tiny_models):
    # NOTE: --kernels torch: this is about queue order, and it need not wait for a C++ kernel build
    server = start_api_server(tmp_path_factory.mktemp("priority"), tiny_models["llama"], "--scheduling-policy",
                              "priority", "--max-batch-size", "1", "--cache-block-count", "256",
                              "--max-concurrent-requests", "32", "--kernels", "torch")
    yield server
    server.stop()


@pytest.mark.slow
def test_api_priority_field_orders_the_queue_and_shows_in_metrics(priority_server):
    url = priority_server.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": "hello there", "temperature": 0, "ignore_eos": True}
    finished: list[str] = []

    def post(name, endpoint, extra):
        r = httpx.post(f"{url}{endpoint}", json={**body, **extra}, timeout=120)
        assert r.status_code == 200, r.text
        finished.append(name)

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        busy = pool.submit(post, "busy", "/v1/completions", {"max_tokens": 800})
        time.sleep(0.5)
        normal = [pool.submit(post, f"n{i}", "/v1/completions", {"max_tokens": 8, "priority": 0})
                  for i in range(10)]
        # the waiting queue by priority level, while the 11 wait
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = httpx.get(f"{url}/metrics").text
            if 'lmserve:num_requests_waiting_by_priority{priority="0"} 10.0' in m:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the 10 queued requests never showed in num_requests_waiting_by_priority:\n{m}")
        urgent = pool.submit(post, "urgent", "/generate", {"max_tokens": 8, "priority": -1})
        for f in [busy, urgent, *normal]:
            f.result()
    assert finished[0] == "busy" and finished[1] == "urgent", finished


def test_api_bad_priority_is_400_naming_it(priority_server):
    r = httpx.post(f"{priority_server.url}/v1/chat/completions",
                   json={"model": "whatever", "messages": [{"role": "user", "content": "hi"}], "priority": "high"})
    assert r.status_code == 400 and "priority" in r.text, r.text
