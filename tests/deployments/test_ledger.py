"""The admission ledger's rules, without Ray: leases against measured capacity, refusals
with reasons, Retry-After from the drain rate, and reclaiming the leases of replicas and
ingresses that stopped reporting."""

from __future__ import annotations

from deployments.admission.ledger import AdmissionLedger, Ask, LeaseRule, Verdict


def ledger(**kw) -> AdmissionLedger:
    led = AdmissionLedger(replica_timeout_s=5, holder_timeout_s=15, **kw)
    led.replica_report("m", "r1", 1000, [], now=0)
    led.replica_report("m", "r2", 600, [], now=0)
    return led


def test_admits_until_the_sum_of_capacities_then_refuses_with_retry_after():
    led = ledger()
    granted = [led.reserve("m", 400, "h", now=1) for _ in range(4)]
    assert all(d.verdict is Verdict.ADMITTED for d in granted)
    full = led.reserve("m", 400, "h", now=1)
    assert full.verdict is Verdict.CAPACITY and full.capacity == 1600
    assert 1 <= full.retry_after_s <= 30
    assert led.snapshot("m")["reserved"] == 1600
    for d in granted:
        assert led.release(d.lease_id, now=2)
        assert not led.release(d.lease_id, now=2)  # idempotent
    assert led.snapshot("m")["reserved"] == 0


def test_retry_after_follows_the_drain_rate():
    led = ledger(drain_window_s=10, retry_after_max_s=30)
    first = [led.reserve("m", 800, "h", now=0) for _ in range(2)]
    assert led.reserve("m", 100, "h", now=0).retry_after_s == 1  # nothing measured: soon
    for d in first:
        led.release(d.lease_id, now=1)  # 1600 tokens drained in the 10 s window: 160/s
    for _ in range(16):
        assert led.reserve("m", 100, "h", now=1).verdict is Verdict.ADMITTED
    assert led.reserve("m", 480, "h", now=2).retry_after_s == 3  # 480 short / 160 per s


def test_a_request_larger_than_any_replica_is_too_large_unless_clamped():
    led = ledger()
    too = led.reserve("m", 1001, "h", now=0)
    assert too.verdict is Verdict.TOO_LARGE and too.largest == 1000
    clamped = led.reserve("m", 5000, "h", now=0, clamp=True)
    assert clamped.verdict is Verdict.ADMITTED and led.leases[clamped.lease_id].tokens == 1000


def test_no_replicas_and_capacity_fraction():
    led = AdmissionLedger(capacity_fraction=0.5)
    assert led.reserve("m", 1, "h", now=0).verdict is Verdict.NO_REPLICAS
    led.replica_report("m", "r1", 1000, [], now=0)
    assert led.snapshot("m")["capacity"] == 500


def test_a_silent_replica_loses_its_capacity_and_its_leases():
    led = ledger()
    a = led.reserve("m", 500, "h", now=0)
    b = led.reserve("m", 300, "h", now=0)
    led.replica_report("m", "r1", 1000, [a.lease_id], now=1)
    led.replica_report("m", "r2", 600, [b.lease_id], now=1)
    led.holder_report("h", now=5)
    led.replica_report("m", "r1", 1000, [a.lease_id], now=5)
    assert led.expire(now=7) == 1  # r2 silent since t=1
    snap = led.snapshot("m")
    assert snap["capacity"] == 1000 and snap["reserved"] == 500
    assert b.lease_id not in led.leases and a.lease_id in led.leases


def test_a_silent_ingress_loses_its_leases():
    led = ledger()
    mine = led.reserve("m", 200, "ingress-1", now=0)
    other = led.reserve("m", 200, "ingress-2", now=0)
    for t in (5, 10, 15):
        led.holder_report("ingress-2", now=t)
        led.replica_report("m", "r1", 1000, [], now=t)
        led.replica_report("m", "r2", 600, [], now=t)
    assert led.expire(now=16) == 1
    assert mine.lease_id not in led.leases and other.lease_id in led.leases
    assert led.snapshot("m")["reserved"] == 200


# ---- leases that follow use ---------------------------------------------------------


def test_the_lease_rule_holds_a_first_allotment_then_one_block_ahead_up_to_the_ceiling():
    rule = LeaseRule(first_output_tokens=256, block_tokens=64)
    assert rule.tokens(10, 2000) == 266  # prompt + the first allotment
    assert rule.tokens(10, 2000, generated=255) == 266
    assert rule.tokens(10, 2000, generated=256) == 10 + 320  # one block past 256
    assert rule.tokens(10, 2000, generated=1990) == 2010  # never past prompt + max_tokens
    assert rule.tokens(10, 100) == 110  # max_tokens below the allotment: all of it
    assert rule.ask(10, 2000) == Ask(266, ceiling=2010, max_output=2000)
    old = LeaseRule(follow_use=False)
    assert old.tokens(10, 2000) == old.tokens(10, 2000, generated=500) == 2010


def test_a_lease_grows_with_its_reported_use_and_never_past_its_ceiling():
    led = ledger()
    d = led.reserve("m", 266, "h", now=0, ceiling=1000, max_output=990)
    led.replica_report("m", "r1", 1000, {d.lease_id: (330, 300)}, now=1)
    assert led.snapshot("m")["reserved"] == 330
    led.replica_report("m", "r1", 1000, {d.lease_id: (300, 310)}, now=2)
    assert led.snapshot("m")["reserved"] == 330  # a lease never shrinks while it runs
    led.replica_report("m", "r1", 1000, {d.lease_id: (4000, 990)}, now=3)
    assert led.snapshot("m")["reserved"] == 1000  # capped at its ceiling
    led.release(d.lease_id, now=4)
    assert led.snapshot("m")["reserved"] == 0  # the grown tokens are released too


def test_a_ceiling_larger_than_any_replica_is_too_large_though_the_first_lease_fits():
    led = ledger()
    d = led.reserve("m", 300, "h", now=0, ceiling=1001, max_output=1000)
    assert d.verdict is Verdict.TOO_LARGE and d.largest == 1000


def test_growth_is_booked_past_capacity_and_new_leases_wait_for_room():
    led = ledger()  # 1600 tokens over two replicas
    a = led.reserve("m", 700, "h", now=0, ceiling=1000, max_output=900)
    b = led.reserve("m", 500, "h", now=0, ceiling=600, max_output=500)
    led.replica_report("m", "r1", 1000, {a.lease_id: (1000, 900)}, now=1)
    led.replica_report("m", "r2", 600, {b.lease_id: (600, 500)}, now=1)
    assert led.snapshot("m")["reserved"] == 1600
    assert led.reserve("m", 10, "h", now=1).verdict is Verdict.CAPACITY
    led.release(b.lease_id, now=2)
    assert led.reserve("m", 10, "h", now=2).verdict is Verdict.ADMITTED


def test_a_replica_under_kv_pressure_offers_no_new_room():
    led = ledger()
    a = led.reserve("m", 300, "h", now=0)
    led.replica_report("m", "r1", 1000, {a.lease_id: (300, 0)}, now=1,
                       load={"kv_pressure": True})
    assert led.snapshot("m")["capacity"] == 300 + 600  # r1: only what it holds
    assert led.reserve("m", 601, "h", now=1).verdict is Verdict.CAPACITY
    led.replica_report("m", "r1", 1000, {a.lease_id: (300, 0)}, now=2)  # pressure over
    assert led.reserve("m", 601, "h", now=2).verdict is Verdict.ADMITTED


def test_retry_after_is_when_enough_leases_should_end_at_the_replicas_pace():
    led = AdmissionLedger(retry_after_max_s=30)
    led.replica_report("m", "r1", 1000, [], now=0, load={"decode_step_s": 0.05})
    slow = led.reserve("m", 500, "h", now=0, ceiling=500, max_output=400)
    fast = led.reserve("m", 500, "h", now=0, ceiling=500, max_output=400)
    led.replica_report("m", "r1", 1000, {slow.lease_id: (500, 0), fast.lease_id: (500, 320)},
                       now=1, load={"decode_step_s": 0.05})
    # 80 tokens left for `fast` x 0.05 s = 4 s; 400 left for `slow` = 20 s
    assert led.reserve("m", 100, "h", now=1).retry_after_s == 4
    assert led.reserve("m", 600, "h", now=1).retry_after_s == 20  # needs both ended
    assert led.reserve("m", 100, "h", now=1.2).retry_after_s == 4  # cached order: ceil(3.8)


def test_retry_after_expects_what_the_pools_generations_ran_on_average():
    led = AdmissionLedger(retry_after_max_s=60)
    led.replica_report("m", "r1", 1000, [], now=0, load={"decode_step_s": 0.1})
    done = [led.reserve("m", 100, "h", now=0, ceiling=1000, max_output=990) for _ in range(2)]
    led.replica_report("m", "r1", 1000, {d.lease_id: (100, 30) for d in done}, now=1,
                       load={"decode_step_s": 0.1})
    for d in done:
        led.release(d.lease_id, now=1)  # both ran 30 tokens: the pool's mean
    live = led.reserve("m", 1000, "h", now=1, ceiling=1000, max_output=990)
    led.replica_report("m", "r1", 1000, {live.lease_id: (1000, 10)}, now=1,
                       load={"decode_step_s": 0.1})
    # expected 30 - 10 = 20 more tokens (not the 980 its max_tokens allows) x 0.1 s
    assert led.reserve("m", 10, "h", now=1.3).retry_after_s == 2


def test_a_released_generation_counts_what_it_ran_since_its_last_report():
    led = AdmissionLedger(retry_after_max_s=60)
    led.replica_report("m", "r1", 1000, [], now=0, load={"decode_step_s": 0.1})
    d = led.reserve("m", 100, "h", now=0, ceiling=1000, max_output=990)
    led.replica_report("m", "r1", 1000, {d.lease_id: (100, 30)}, now=1,
                       load={"decode_step_s": 0.1})
    led.release(d.lease_id, now=2)  # a second after the report: 10 more tokens at 0.1 s
    assert led.pools["m"].output_tokens == 40


def test_a_replica_under_pressure_that_holds_no_lease_still_offers_its_capacity():
    led = ledger()
    led.replica_report("m", "r1", 1000, {}, now=1, load={"kv_pressure": True})
    assert led.snapshot("m")["capacity"] == 1600
