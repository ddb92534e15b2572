"""A bumble virtual controller that behaves like a radio where stock bumble does not.

Stock bumble links controllers in one process, but (found by the BLE probe, see docs/testbench.md):

* a central reports "connected" as soon as it hears an advertisement, even when the advertiser
  has already accepted another central: the loser is connected to nobody and its first ATT request
  times out after 30 s;
* scan responses are never delivered, and the advertising interval is misread (0.625 ms units
  taken as milliseconds);
* a controller whose host died keeps advertising and keeps its links, so peers never see a
  disconnection and reconnecting fails with "connection already exists";
* LE Create Connection Cancel never completes the pending connection, so a host that times out
  waits forever.

:class:`RadioController` fixes these. Everything runs on one event loop, so a connection is made
atomically: the central's controller hands CONNECT_IND straight to the advertiser's controller and
only reports success if the advertiser took it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from bumble import hci, ll
from bumble.controller import Connection, Controller, LegacyAdvertiser
from bumble.core import PhysicalTransport
from bumble.link import LocalLink
from bumble.transport.common import TransportSink

logger = logging.getLogger(__name__)

# The RSSI every report carries: the virtual radio has no distance.
REPORTED_RSSI = -50

# Advertising intervals shorter than this are raised to it (Core Vol 6, Part B §4.4.2.2: 20 ms).
_MIN_ADVERTISING_INTERVAL_S = 0.020

_AdvertisingReport = hci.HCI_LE_Advertising_Report_Event
_ErrorCode = hci.HCI_ErrorCode


@dataclass
class _TimedLegacyAdvertiser(LegacyAdvertiser):
    """Legacy advertiser that reads its interval in 0.625 ms units, as HCI defines it."""

    def _on_timer_fired(self) -> None:
        self.send_advertising_data()
        interval_s = max(self.advertising_interval_min * 0.000625, _MIN_ADVERTISING_INTERVAL_S)
        self.timer_handle = asyncio.get_running_loop().call_later(interval_s, self._on_timer_fired)


class RadioController(Controller):
    """One node's radio: legacy advertising and scanning, race-free connections, link loss."""

    # LE Data Length Extension: whole 251-byte PDUs, so a 247-byte ATT MTU is one ACL packet.
    le_acl_data_packet_length = 251
    supported_max_tx_octets = 251
    supported_max_rx_octets = 251
    suggested_max_tx_octets = 251
    # Legacy advertising only: hosts then use the legacy HCI commands, whose scan responses and
    # connection handover this class implements.
    le_features = Controller.le_features & ~(
        hci.LeFeatureMask.LE_EXTENDED_ADVERTISING | hci.LeFeatureMask.LE_PERIODIC_ADVERTISING
    )

    def __init__(
        self,
        name: str,
        *,
        link: LocalLink,
        public_address: str,
        link_loss_delay: float = 0.0,
    ) -> None:
        super().__init__(name, link=link, public_address=public_address)
        self.le_legacy_advertiser = _TimedLegacyAdvertiser(self)
        self.link_loss_delay = link_loss_delay
        self._reported_advertisers: set[bytes] = set()

    # ------------------------------------------------------------------ host lifecycle

    def attach_host(self, sink: TransportSink) -> None:
        """A host stack connected: start from a clean radio."""
        self.drop_host()
        self.host = sink

    def drop_host(self) -> None:
        """The host went away: act like a radio that lost power.

        Peers see their links end with "connection timeout" (0x08), as after a supervision
        timeout, and nobody hears this radio advertise again.
        """
        self.host = None
        self._power_down()

    def _power_down(self) -> None:
        for peer_address, connection in list(self.le_connections.items()):
            del self.le_connections[peer_address]
            self._signal_link_loss(connection)
        self.le_legacy_advertiser.stop()
        for advertising_set in self.advertising_sets.values():
            advertising_set.stop()
        self.advertising_sets.clear()
        self.le_scan_enable = False
        self._reported_advertisers.clear()
        self.pending_le_connection = None

    def _signal_link_loss(self, connection: Connection) -> None:
        def tell_peer() -> None:
            try:
                self.link.send_ll_control_pdu(
                    sender_address=connection.self_address,
                    receiver_address=connection.peer_address,
                    packet=ll.TerminateInd(_ErrorCode.CONNECTION_TIMEOUT_ERROR),
                )
            except Exception:  # the peer may be gone as well
                logger.debug("%s: peer %s already gone", self.name, connection.peer_address)

        if self.link_loss_delay > 0:
            asyncio.get_running_loop().call_later(self.link_loss_delay, tell_peer)
        else:
            tell_peer()

    def on_hci_reset_command(self, command: hci.HCI_Reset_Command) -> hci.HCI_StatusReturnParameters:
        # A reset drops every link without telling the peers (they time out) and stops everything.
        self._power_down()
        return super().on_hci_reset_command(command)

    # ------------------------------------------------------------------ scanning

    def on_hci_le_set_scan_enable_command(
        self, command: hci.HCI_LE_Set_Scan_Enable_Command
    ) -> hci.HCI_StatusReturnParameters:
        self._reported_advertisers.clear()
        return super().on_hci_le_set_scan_enable_command(command)

    def on_advertising_pdu(self, pdu: ll.AdvInd | ll.AdvExtInd) -> None:
        if not isinstance(pdu, ll.AdvInd):
            return
        address = pdu.advertiser_address
        if self.le_scan_enable and self._should_report(address):
            self.send_hci_packet(
                _AdvertisingReport(
                    [
                        _AdvertisingReport.Report(
                            event_type=_AdvertisingReport.EventType.ADV_IND,
                            address_type=address.address_type,
                            address=address,
                            data=pdu.data,
                            rssi=REPORTED_RSSI,
                        )
                    ]
                )
            )
            if self.le_scan_type == hci.HCI_LE_Set_Scan_Parameters_Command.ACTIVE_SCANNING:
                self._report_scan_response(address)
        pending = self.pending_le_connection
        if pending is not None and pending.peer_address == address:
            self.create_le_connection(address)

    def _should_report(self, address: hci.Address) -> bool:
        if not self.filter_duplicates:
            return True
        key = bytes(address)
        if key in self._reported_advertisers:
            return False
        self._reported_advertisers.add(key)
        return True

    def _report_scan_response(self, address: hci.Address) -> None:
        advertiser = self._find_advertiser(address)
        if advertiser is None:
            return
        self.send_hci_packet(
            _AdvertisingReport(
                [
                    _AdvertisingReport.Report(
                        event_type=_AdvertisingReport.EventType.SCAN_RSP,
                        address_type=address.address_type,
                        address=address,
                        data=advertiser.le_legacy_advertiser.scan_response_data,
                        rssi=REPORTED_RSSI,
                    )
                ]
            )
        )

    def _find_advertiser(self, address: hci.Address) -> RadioController | None:
        """The controller advertising at ``address`` right now, if any."""
        for controller in self.link.controllers:
            if (
                controller is not self
                and isinstance(controller, RadioController)
                and controller.le_legacy_advertiser.enabled
                and controller.le_legacy_advertiser.address == address
            ):
                return controller
        return None

    # ------------------------------------------------------------------ connections

    def on_hci_le_create_connection_command(self, command: hci.HCI_LE_Create_Connection_Command) -> None:
        if command.peer_address in self.le_connections:
            self._send_hci_command_status(_ErrorCode.CONNECTION_ALREADY_EXISTS_ERROR, command.op_code)
            return None
        return super().on_hci_le_create_connection_command(command)

    def on_hci_le_create_connection_cancel_command(
        self, command: hci.HCI_LE_Create_Connection_Cancel_Command
    ) -> hci.HCI_StatusReturnParameters:
        pending = self.pending_le_connection
        if pending is None:
            return hci.HCI_StatusReturnParameters(_ErrorCode.COMMAND_DISALLOWED_ERROR)
        self.pending_le_connection = None
        failure = hci.HCI_LE_Connection_Complete_Event(
            status=_ErrorCode.UNKNOWN_CONNECTION_IDENTIFIER_ERROR,
            connection_handle=0,
            role=hci.Role.CENTRAL,
            peer_address_type=pending.peer_address.address_type,
            peer_address=pending.peer_address,
            connection_interval=0,
            peripheral_latency=0,
            supervision_timeout=0,
            central_clock_accuracy=0,
        )
        # Core Vol 4, Part E §7.8.13: Command Complete first, then the failed connection.
        asyncio.get_running_loop().call_soon(self.send_hci_packet, failure)
        return hci.HCI_StatusReturnParameters(_ErrorCode.SUCCESS)

    def create_le_connection(self, peer_address: hci.Address) -> None:
        """Connect to ``peer_address`` if it is still advertising and free; else keep waiting."""
        pending = self.pending_le_connection
        if not isinstance(pending, hci.HCI_LE_Create_Connection_Command):
            return
        target = self._find_advertiser(peer_address)
        if target is None:
            return  # taken by another central or gone: wait for the next advertisement
        self_address = (
            self.public_address
            if pending.own_address_type == hci.OwnAddressType.PUBLIC
            else self.random_address
        )
        target.on_le_connect_ind(
            ll.ConnectInd(
                initiator_address=self_address,
                advertiser_address=peer_address,
                interval=pending.connection_interval_min,
                latency=pending.max_latency,
                timeout=pending.supervision_timeout,
            )
        )
        if self_address not in target.le_connections:
            return
        connection = Connection(
            controller=self,
            handle=self.allocate_connection_handle(),
            role=hci.Role.CENTRAL,
            self_address=self_address,
            peer_address=pending.peer_address,
            link=self.link,
            transport=PhysicalTransport.LE,
            link_type=hci.HCI_Connection_Complete_Event.LinkType.ACL,
        )
        self.le_connections[pending.peer_address] = connection
        self.pending_le_connection = None
        self.send_hci_packet(
            hci.HCI_LE_Connection_Complete_Event(
                status=_ErrorCode.SUCCESS,
                connection_handle=connection.handle,
                role=hci.Role.CENTRAL,
                peer_address_type=pending.peer_address.address_type,
                peer_address=pending.peer_address,
                connection_interval=pending.connection_interval_min,
                peripheral_latency=pending.max_latency,
                supervision_timeout=pending.supervision_timeout,
                central_clock_accuracy=0,
            )
        )

    def on_ll_control_pdu(self, sender_address: hci.Address, packet: ll.ControlPdu) -> None:
        if sender_address not in self.le_connections:
            return  # a link this radio already dropped (its host died): nothing to tell
        super().on_ll_control_pdu(sender_address, packet)
