"""The admission ledger's rules, without Ray: leases against measured capacity, refusals
with reasons, Retry-After from the drain rate, and reclaiming the leases of replicas and
ingresses that stopped reporting."""

from __future__ import annotations

from deployments.ledger import AdmissionLedger, Verdict


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
    assert led.reserve("m", 100, "h", now=0).retry_after_s == 30  # nothing drained yet
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
