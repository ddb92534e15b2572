"""The box's 4G uplink against the real settlement server on loopback (SQLite).

The box pushes its ledger and gets acks, receives tariffs and revocations, obeys a remote stop,
and goes quiet while the link is switched off.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from pathlib import Path

from box_peripheral.uplink import Uplink
from ledger_server.keys import load_keys
from protocol import cose, messages, testing
from protocol.tokens import EndReason
from testbench.box_rig import BOX_KEY, box_rig
from tests.ledger_server.conftest import (  # noqa: F401 - the server's fixtures, used by name
    RunningServer,
    api_for,
    key_directory,
    sqlite_server,
    sqlite_template,
    sqlite_url,
)

DEADLINE_S = 15.0


async def eventually(check: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Wait for the uplink to have done something; it works on its own schedule."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not await _value(check()):
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_the_uplink_syncs_the_ledger_updates_and_remote_stop(
    sqlite_server: RunningServer,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    keys = load_keys(sqlite_server.config.key_directory)
    async with api_for(sqlite_server) as api:
        provisioned = await api.provision(testing.SAMPLE_BOX_ID, BOX_KEY)
        certificate = base64.b64decode(provisioned["certificate"])
        user = await api.shared_user()
        device = await api.user_device(user)
        await api.top_up(user, 2000)
        async with box_rig(
            tmp_path / "box.sqlite",
            operator=keys.signer,
            operator_encryption_key=keys.encryption_public_key,
            signed_certificate=certificate,
        ) as rig:
            off_switch = tmp_path / "uplink-off"
            uplink = Uplink(
                rig.controller,
                server=sqlite_server.base_url,
                box_key=cose.SigningKey.from_private_key(BOX_KEY),
                off_switch=off_switch,
                long_poll_s=1,
            )
            running = asyncio.create_task(uplink.run())
            try:
                store = rig.controller.store
                # a box sells at the operator's tariff: it gets one before its first session
                await api.set_tariff(default_price=130)
                await eventually(lambda: rig.controller.tariff()[1] == 130, "the first tariff")
                # a session, paid with a grant the server issued, ends; its receipt reaches the server
                phone = rig.phone(device)
                grant = await api.grant(user, device, 500)
                started = await rig.start(phone, grant=grant.signed)
                await rig.request(phone, messages.StopSession(request_id=90, session_id=started.session_id))
                last = await store.last_sequence()
                await eventually(lambda: _acked(store, last), "the server's ack for the receipt")

                # operator updates reach the box over 4G
                await api.set_tariff(default_price=150)
                await eventually(lambda: rig.controller.tariff()[1] == 150, "the new tariff")
                await api.call(
                    "POST",
                    "/v1/operator/revocations",
                    token=await api.operator(),
                    json={"user_ids": [999]},
                    expect=201,
                )
                await eventually(
                    lambda: (r := rig.controller.revocations()) is not None and 999 in r.user_ids,
                    "the revocation list",
                )

                # remote fee control: the operator stops a running session
                second = await api.grant(user, device, 500)
                running_session = await rig.start(phone, outlet=2, grant=second.signed)
                await api.call(
                    "POST",
                    f"/v1/operator/boxes/{testing.SAMPLE_BOX_ID}/commands",
                    token=await api.operator(),
                    json={"kind": "remote_stop", "outlet": 2},
                    expect=201,
                )
                await eventually(lambda: bool(phone.received(messages.SessionEnded)[1:]), "the remote stop")
                ended = phone.last(messages.SessionEnded)
                assert isinstance(ended, messages.SessionEnded)
                assert ended.session_id == running_session.session_id
                assert ended.end_reason is EndReason.REMOTE_STOP

                # 4G down: nothing moves; back up: it catches up
                off_switch.touch()
                await eventually(lambda: not uplink.connected, "the link to go down")
                await api.set_tariff(default_price=170)
                await asyncio.sleep(1.5)
                assert rig.controller.tariff()[1] == 150
                off_switch.unlink()
                await eventually(lambda: rig.controller.tariff()[1] == 170, "the tariff after the outage")
                last = await store.last_sequence()
                await eventually(lambda: _acked(store, last), "every entry acknowledged after the outage")
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
        assert not await api.anomalies()


async def _value(result: bool | Awaitable[bool]) -> bool:
    return result if isinstance(result, bool) else await result


async def _acked(store: object, sequence: int) -> bool:
    from box_peripheral.store import BoxStore

    assert isinstance(store, BoxStore)
    return await store.acked_sequence() >= sequence
