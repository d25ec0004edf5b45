"""In-flight batching scheduler: admission, token budget, chunked context, capacity policies."""

from __future__ import annotations

import pytest

from enginesmith.runtime.engine.kv_cache import PagedKVCache
from enginesmith.runtime.engine.request import Request, Status
from enginesmith.runtime.engine.scheduler import Schedule, Scheduler


def _scheduler(num_blocks=32, tpb=4, **kw) -> Scheduler:
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_size=1, num_blocks=num_blocks, tokens_per_block=tpb)
    return Scheduler(cache, **{"max_batch_size": 8, "max_num_tokens": 64, **kw})


def _req(prompt_len: int, new: int, rid: str = "") -> Request:
    return Request(prompt=[1] * prompt_len, max_new_tokens=new, request_id=rid)


def _advance(s: Scheduler, sched: Schedule) -> list[Request]:
    """What the engine does after the forward: mark tokens computed, append a token, finish at length."""
    done = []
    for c in sched.chunks:
        assert c.start == c.request.num_computed
        c.request.num_computed += c.num_tokens
        if c.samples:
            c.request.context_done = True
            c.request.tokens.append(7)
            if len(c.request.tokens) >= c.request.max_total_len:
                c.request.status = Status.FINISHED
                s.release(c.request)
                done.append(c.request)
    return done


def _drain(s: Scheduler, max_iters=500) -> list[Schedule]:
    history = []
    for _ in range(max_iters):
        if not s.has_work():
            return history
        sched = s.schedule()
        history.append(sched)
        _advance(s, sched)
    raise AssertionError("scheduler did not finish its work")


def test_a_new_request_joins_running_decodes_in_the_same_iteration():
    s = _scheduler()
    a = _req(5, 4)
    s.add(a)
    first = s.schedule()
    assert [(c.request, c.num_tokens, c.is_context) for c in first.chunks] == [(a, 5, True)]
    _advance(s, first)
    b = _req(6, 3)
    s.add(b)
    mixed = s.schedule()
    assert [(c.request, c.num_tokens, c.is_context) for c in mixed.chunks] == [(a, 1, False), (b, 6, True)]
    assert mixed.num_context == 1 and mixed.num_generation == 1 and mixed.num_tokens == 7


def test_token_budget_bounds_every_iteration_and_keeps_first_come_first_served():
    s = _scheduler(max_num_tokens=10)
    reqs = [_req(6, 2), _req(6, 2), _req(3, 2)]
    for r in reqs:
        s.add(r)
    first = s.schedule()
    # the second prompt (6) does not fit next to the first (6 of 10); the third may not overtake it
    assert [c.request for c in first.chunks] == [reqs[0]]
    history = [first] + _drain_after(s, first)
    assert all(h.num_tokens <= 10 for h in history)
    assert s.cache.num_free_blocks == s.cache.num_blocks


def test_chunked_context_splits_a_long_prompt_into_block_multiples():
    s = _scheduler(max_num_tokens=10, enable_chunked_context=True)
    r = _req(22, 2)
    s.add(r)
    chunks = []
    for _ in range(3):
        sched = s.schedule()
        chunks += [(c.start, c.num_tokens, c.samples) for c in sched.chunks]
        _advance(s, sched)
    assert chunks == [(0, 8, False), (8, 8, False), (16, 6, True)]
    assert r.output == [7] and len(s.cache.block_table(r.seq_id)) == 6


def test_without_chunked_context_a_prompt_runs_whole():
    s = _scheduler(max_num_tokens=10)
    running = _req(4, 50)
    s.add(running)
    _advance(s, s.schedule())
    s.add(_req(10, 1))
    sched = s.schedule()
    assert [c.num_tokens for c in sched.chunks] == [1]  # the decode; 10 prompt tokens do not fit next to it


def test_max_batch_size_caps_the_requests_of_an_iteration():
    s = _scheduler(max_batch_size=3)
    for _ in range(5):
        s.add(_req(2, 3))
    history = _drain(s)
    assert max(len(h.chunks) for h in history) == 3
    assert len(history[0].chunks) == 3


def test_guaranteed_no_evict_reserves_whole_requests_and_never_preempts():
    s = _scheduler(num_blocks=6, tpb=4)  # each request below needs 3 blocks at full length
    reqs = [_req(4, 8) for _ in range(3)]
    for r in reqs:
        s.add(r)
    first = s.schedule()
    assert [c.request for c in first.chunks] == reqs[:2]
    assert s.num_reserved_blocks == 6 and s.cache.num_used_blocks == 2  # reserved, allocated lazily
    history = [first] + _drain_after(s, first)
    assert not any(h.preempted for h in history)
    assert all(r.num_preemptions == 0 and len(r.output) == 8 for r in reqs)
    third_start = next(i for i, h in enumerate(history) if any(c.request is reqs[2] for c in h.chunks))
    assert third_start > 1  # waited for a finished request's blocks
    assert s.cache.num_free_blocks == 6 and s.num_reserved_blocks == 0


def _drain_after(s: Scheduler, sched: Schedule) -> list[Schedule]:
    _advance(s, sched)
    return _drain(s)


def test_max_utilization_admits_more_then_pauses_the_newest_and_recomputes():
    s = _scheduler(num_blocks=6, tpb=4, policy="max_utilization")
    reqs = [_req(4, 8, rid=str(i)) for i in range(3)]
    for r in reqs:
        s.add(r)
    first = s.schedule()
    assert [c.request for c in first.chunks] == reqs  # only the prompt blocks are needed now
    history = [first] + _drain_after(s, first)
    paused = [r for h in history for r in h.preempted]
    assert paused and paused[0] is reqs[2]  # the most recently admitted goes first
    assert all(len(r.output) == 8 for r in reqs)
    recomputes = [c for h in history[1:] for c in h.chunks if c.request is reqs[2] and c.start == 0]
    assert recomputes and recomputes[0].num_tokens > 4  # prompt + the tokens it had generated
    assert s.cache.num_free_blocks == 6


def test_release_frees_waiting_and_running_requests():
    s = _scheduler(num_blocks=8, tpb=4)
    a, b = _req(8, 4), _req(8, 4)
    s.add(a)
    s.add(b)
    s.schedule()
    s.release(a)
    s.release(b)
    assert not s.has_work() and s.cache.num_free_blocks == 8 and s.num_reserved_blocks == 0


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="batch_scheduler_policy='fcfs'"):
        _scheduler(policy="fcfs")


def _reuse_scheduler(num_blocks=32, tpb=4, **kw) -> Scheduler:
    cache = PagedKVCache(num_layers=1, num_kv_heads=1, head_size=1, num_blocks=num_blocks, tokens_per_block=tpb,
                         enable_reuse=True)
    return Scheduler(cache, **{"max_batch_size": 8, "max_num_tokens": 64, **kw})


def _prompt_req(prompt: list[int], new: int, rid: str = "") -> Request:
    return Request(prompt=prompt, max_new_tokens=new, request_id=rid)


SYSTEM = list(range(100, 112))  # three blocks of 4


def test_reuse_starts_a_later_request_after_the_cached_prefix_of_a_running_one():
    s = _reuse_scheduler()
    a = _prompt_req(SYSTEM + [1, 2], 6)
    s.add(a)
    _advance(s, s.schedule())  # a's prompt is computed; its three full blocks are published next iteration
    b = _prompt_req(SYSTEM + [3], 2)
    s.add(b)
    sched = s.schedule()
    assert [(c.request, c.start, c.num_tokens) for c in sched.chunks] == [(a, 14, 1), (b, 12, 1)]
    assert s.cache.block_table(b.seq_id)[:3] == s.cache.block_table(a.seq_id)[:3]
    assert (b.kv_reused_blocks, b.kv_new_blocks) == (3, 1) and (a.kv_reused_blocks, a.kv_new_blocks) == (0, 4)
    assert (s.cache.reused_blocks, s.cache.missed_blocks) == (3, 4 + 1)
    _advance(s, sched)
    _drain(s)
    assert s.cache.num_free_blocks == s.cache.num_blocks and s.cache.num_used_blocks == 0
    assert s.cache.num_cached_blocks > 0  # the prefix stays cached for the next request


def test_reuse_of_a_finished_requests_blocks_and_of_the_whole_prompt_but_one_token():
    s = _reuse_scheduler()
    a = _prompt_req(SYSTEM, 1)
    s.add(a)
    _drain(s)
    b = _prompt_req(SYSTEM, 3)  # the same prompt: its last block is computed again for the logits
    s.add(b)
    sched = s.schedule()
    assert [(c.start, c.num_tokens, c.samples) for c in sched.chunks] == [(8, 4, True)]
    assert b.kv_reused_blocks == 2


def test_requests_admitted_in_the_same_iteration_do_not_share_unwritten_blocks():
    s = _reuse_scheduler()
    a, b = _prompt_req(SYSTEM + [1], 2), _prompt_req(SYSTEM + [2], 2)
    s.add(a)
    s.add(b)
    sched = s.schedule()
    assert [c.start for c in sched.chunks] == [0, 0]
    assert not set(s.cache.block_table(a.seq_id)) & set(s.cache.block_table(b.seq_id))


def test_max_utilization_counts_a_shared_prefix_once():
    """Six blocks: a holds four; b's 13-token prompt needs four more without reuse, one with it."""
    for reuse, admitted in ((False, False), (True, True)):
        s = (_reuse_scheduler if reuse else _scheduler)(num_blocks=6, policy="max_utilization")
        a, b = _prompt_req(SYSTEM + [1], 8), _prompt_req(SYSTEM + [2], 8)
        s.add(a)
        _advance(s, s.schedule())
        s.add(b)
        sched = s.schedule()
        assert (b in [c.request for c in sched.chunks]) is admitted, reuse


def test_a_paused_request_recomputes_only_what_is_no_longer_cached():
    s = _reuse_scheduler(num_blocks=8, policy="max_utilization")
    reqs = [_prompt_req(SYSTEM + [i], 8, rid=str(i)) for i in range(3)]
    for r in reqs:
        s.add(r)
    history = _drain(s)
    paused = [r for h in history for r in h.preempted]
    assert paused  # eight blocks cannot hold three sequences of 21 tokens
    resumed = [c for h in history for c in h.chunks if c.request in paused and c.is_context and c.start > 0]
    assert resumed  # readmitted after the still cached prefix
    assert all(len(r.output) == 8 for r in reqs)
    assert s.cache.num_free_blocks == 8 and s.cache.num_used_blocks == 0
