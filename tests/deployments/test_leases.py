"""The ingress's admission client against the real controller class, without Ray (a fake
handle calls the controller's methods): far from capacity a request is granted without a
round trip and booked by the next exchange; near capacity the controller decides; a
burst shares exchanges; a release never overtakes its grant."""

from __future__ import annotations

import asyncio

import pytest

from deployments.admission.controller import AdmissionController
from deployments.http.errors import APIError
from deployments.admission.leases import AdmissionClient
from deployments.admission.ledger import AdmissionLedger, Ask, Verdict


class _Method:
    def __init__(self, handle, name):
        self.handle, self.name = handle, name

    def remote(self, *args):
        self.handle.calls.append(self.name)

        async def call():
            await asyncio.sleep(0)  # a round trip: other tasks run meanwhile
            return await getattr(self.handle.controller, self.name)(*args)

        return call()


class FakeHandle:
    def __init__(self, controller):
        self.controller, self.calls = controller, []

    def __getattr__(self, name):
        return _Method(self, name)


def setup(capacity: int = 1000):
    controller = AdmissionController.func_or_class({"heartbeat_s": 1.0})
    handle = FakeHandle(controller)
    client = AdmissionClient(handle, "ingress-1", heartbeat_s=1.0)
    return controller, handle, client


def asks(handle: FakeHandle) -> list[str]:
    return [c for c in handle.calls if c != "holder_report"]  # heartbeats aside


async def settle(client: AdmissionClient) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
        if not client._sending and not client._ops:
            return


def test_far_from_capacity_a_request_costs_no_round_trip():
    async def go():
        controller, handle, client = setup()
        await controller.replica_report("m", "r1", 1000, [])
        client._start()
        client._update_views(await controller.holder_report("ingress-1"))
        handle.calls.clear()
        leases = [await client.reserve("m", 100) for _ in range(4)]  # 400 <= 50% of 1000
        assert asks(handle) == []  # nothing waited on the controller
        await settle(client)
        assert asks(handle) == ["exchange"]  # the four grants, booked in one exchange
        assert controller.ledger.view("m")[0] == 400
        near = await client.reserve("m", 300)  # past this ingress's share: asked
        assert not near.lease_id.split(":")[1].startswith("local")
        for lease in [*leases, near]:
            lease.release()
        await settle(client)
        return controller

    controller = asyncio.run(go())
    assert controller.ledger.view("m")[0] == 0 and not controller.ledger.leases


def test_a_burst_shares_exchanges_and_refusals_keep_their_status():
    async def go():
        controller, handle, client = setup()
        await controller.replica_report("m", "r1", 1000, [])
        results = await asyncio.gather(*(client.reserve("m", 300) for _ in range(5)),
                                       return_exceptions=True)
        admitted = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, APIError)]
        assert len(admitted) == 3 and len(refused) == 2
        assert all(r.status == 429 and r.retry_after_s for r in refused)
        assert handle.calls.count("exchange") < 5  # one per batch, not per request
        with pytest.raises(APIError) as too_large:
            await client.reserve("m", 5000)
        assert too_large.value.status == 400 and "1000 tokens" in too_large.value.message
        for lease in admitted:
            lease.release()
        await settle(client)
        return controller

    assert asyncio.run(go()).ledger.view("m")[0] == 0


def test_a_release_queued_behind_its_grant_ends_the_lease():
    async def go():
        controller, _, client = setup()
        await controller.replica_report("m", "r1", 1000, [])
        client._start()
        client._update_views(await controller.holder_report("ingress-1"))
        lease = await client.reserve("m", 50)
        lease.release()  # before any exchange has run: same queue, after the grant
        await settle(client)
        return controller

    controller = asyncio.run(go())
    assert controller.ledger.view("m")[0] == 0 and not controller.ledger.leases


def test_the_ledger_books_grants_once_and_views_count_holders():
    led = AdmissionLedger()
    led.replica_report("m", "r1", 1000, [], now=0)
    led.grant("m", "h1:local-0", 100, "h1", now=1)
    led.grant("m", "h1:local-0", 100, "h1", now=1)  # a retried exchange books nothing more
    led.reserve("m", 50, "h2", now=1)
    assert led.view("m") == (150, 1000, 1000, 2, ())
    assert led.release("h1:local-0", now=2) and led.view("m")[0] == 50
    assert led.reserve("m", 2000, "h2", now=2).verdict is Verdict.TOO_LARGE


def test_near_capacity_a_measured_pool_refuses_without_a_round_trip():
    """Once the replicas have measured their pace, the view carries when room frees: a
    request that cannot fit is refused at the ingress with that Retry-After, counted by
    the next exchange, and the controller is not asked."""
    async def go():
        controller, handle, client = setup()
        load = {"decode_step_s": 0.05}
        await controller.replica_report("m", "r1", 1000, [], load)
        big = await client.reserve("m", Ask(900, ceiling=900, max_output=100))
        await controller.replica_report("m", "r1", 1000, {big.lease_id: (900, 20)}, load)
        await settle(client)
        client._update_views(await controller.holder_report("ingress-1"))  # a heartbeat
        with pytest.raises(APIError) as refused:
            await client.reserve("m", 200)  # 80 tokens left x 0.05 s: room in 4 s
        assert refused.value.status == 429 and refused.value.retry_after_s == 4
        calls = len(asks(handle))
        await settle(client)
        assert asks(handle)[calls:] == ["exchange"]  # only the count of the refusal
        small = await client.reserve("m", 100)  # fits: granted as before
        big.release()
        small.release()
        await settle(client)
        return controller

    controller = asyncio.run(go())
    assert controller.ledger.view("m")[0] == 0 and not controller.ledger.leases


def test_without_a_measured_pace_the_controller_decides_refusals():
    async def go():
        controller, handle, client = setup()
        await controller.replica_report("m", "r1", 1000, [])
        held = await client.reserve("m", 900)
        await settle(client)
        calls = len(asks(handle))
        with pytest.raises(APIError) as refused:
            await client.reserve("m", 200)
        assert refused.value.status == 429
        assert "exchange" in asks(handle)[calls:]  # asked: the view could not say when
        held.release()
        await settle(client)

    asyncio.run(go())
