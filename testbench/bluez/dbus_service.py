"""A small D-Bus object server on dbus-fast's low-level message API.

BlueZ's objects come and go, their property sets depend on state (``MTU`` only while connected,
``WriteAcquired`` only with write-without-response), and every failure must be a proper
``org.bluez.Error.*`` reply. dbus-fast's ``ServiceInterface`` fixes all of that at class level, so
the emulator serves objects itself: method dispatch with signature checks, ``Introspect``
(bless builds its proxies from it), ``Properties``, ``ObjectManager.GetManagedObjects`` at ``/``
and the ``InterfacesAdded``/``InterfacesRemoved``/``PropertiesChanged`` signals.
"""

from __future__ import annotations

import abc
import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar
from xml.sax.saxutils import quoteattr

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from testbench.bluez import errors
from testbench.bluez.errors import BluezError

logger = logging.getLogger(__name__)

INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PROPERTIES = "org.freedesktop.DBus.Properties"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PEER = "org.freedesktop.DBus.Peer"

_INTROSPECT_DOCTYPE = (
    '<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"\n'
    ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">\n'
)

_STANDARD_XML = """  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect"><arg name="xml" type="s" direction="out"/></method>
  </interface>
  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get"><arg name="interface" type="s" direction="in"/><arg name="name" type="s" direction="in"/><arg name="value" type="v" direction="out"/></method>
    <method name="Set"><arg name="interface" type="s" direction="in"/><arg name="name" type="s" direction="in"/><arg name="value" type="v" direction="in"/></method>
    <method name="GetAll"><arg name="interface" type="s" direction="in"/><arg name="properties" type="a{sv}" direction="out"/></method>
    <signal name="PropertiesChanged"><arg name="interface" type="s"/><arg name="changed_properties" type="a{sv}"/><arg name="invalidated_properties" type="as"/></signal>
  </interface>
"""  # noqa: E501

_OBJECT_MANAGER_XML = """  <interface name="org.freedesktop.DBus.ObjectManager">
    <method name="GetManagedObjects"><arg name="objects" type="a{oa{sa{sv}}}" direction="out"/></method>
    <signal name="InterfacesAdded"><arg name="object" type="o"/><arg name="interfaces" type="a{sa{sv}}"/></signal>
    <signal name="InterfacesRemoved"><arg name="object" type="o"/><arg name="interfaces" type="as"/></signal>
  </interface>
"""  # noqa: E501


@dataclass(frozen=True, slots=True)
class Method:
    """A method's arguments, as (name, D-Bus type) pairs."""

    in_args: tuple[tuple[str, str], ...] = ()
    out_args: tuple[tuple[str, str], ...] = ()

    @property
    def in_signature(self) -> str:
        return "".join(arg_type for _, arg_type in self.in_args)

    @property
    def out_signature(self) -> str:
        return "".join(arg_type for _, arg_type in self.out_args)


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodCall:
    """One incoming method call, already checked against its signature."""

    sender: str
    path: str
    interface: str
    member: str
    args: Sequence[Any]
    unix_fds: Sequence[int] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MethodResult:
    """A successful reply. File descriptors in ``unix_fds`` are closed once the reply is sent."""

    body: Sequence[Any] = ()
    unix_fds: Sequence[int] = field(default=())


EMPTY_RESULT = MethodResult()


class DBusInterface(abc.ABC):
    """One interface of one object. Subclasses name it, list its methods and give its properties."""

    NAME: ClassVar[str]
    METHODS: ClassVar[Mapping[str, Method]] = {}
    SIGNALS_XML: ClassVar[str] = ""

    def __init__(self) -> None:
        self._tree: ObjectTree | None = None
        self._path = ""

    @property
    def path(self) -> str:
        return self._path

    def attach(self, tree: ObjectTree, path: str) -> None:
        self._tree = tree
        self._path = path

    def detach(self) -> None:
        self._tree = None

    @abc.abstractmethod
    def properties(self) -> dict[str, Variant]:
        """The properties that exist right now, with their current values."""

    def writable_properties(self) -> frozenset[str]:
        return frozenset()

    async def set_property(self, name: str, value: Variant) -> None:
        """``Properties.Set``; the tree has already checked the name and the type."""
        raise BluezError(errors.PROPERTY_READ_ONLY, f"Property '{name}' is not writable")

    async def call(self, call: MethodCall) -> MethodResult:
        """Run a method from :attr:`METHODS`; the tree has already checked its signature."""
        raise BluezError(errors.UNKNOWN_METHOD, f"Method {call.member} is not implemented")

    def emit_properties_changed(
        self, changed: Mapping[str, Variant], invalidated: Sequence[str] = ()
    ) -> None:
        if self._tree is not None and (changed or invalidated):
            self._tree.emit_properties_changed(self._path, self.NAME, changed, invalidated)


SignalHandler = Callable[[Message], None]


class ObjectTree:
    """The objects one bus connection serves, and the signals that describe their changes."""

    def __init__(self, bus: MessageBus) -> None:
        self._bus = bus
        self._objects: dict[str, dict[str, DBusInterface]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._signal_handlers: list[SignalHandler] = []
        self.closing = False
        """Set on shutdown: background jobs that fail from now on are not worth an error."""
        bus.add_message_handler(self._on_message)

    @property
    def bus(self) -> MessageBus:
        return self._bus

    # ------------------------------------------------------------------ objects

    def export(self, path: str, interfaces: Sequence[DBusInterface]) -> None:
        """Add interfaces at ``path`` (creating the object) and announce them."""
        current = self._objects.setdefault(path, {})
        added: dict[str, dict[str, Variant]] = {}
        for interface in interfaces:
            if interface.NAME in current:
                raise ValueError(f"{path} already has {interface.NAME}")
            interface.attach(self, path)
            current[interface.NAME] = interface
            added[interface.NAME] = interface.properties()
        if added:
            self._emit("/", OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}", [path, added])

    def unexport(self, path: str) -> None:
        """Remove the object at ``path`` (its children stay; remove them first)."""
        interfaces = self._objects.pop(path, None)
        if not interfaces:
            return
        for interface in interfaces.values():
            interface.detach()
        self._emit("/", OBJECT_MANAGER, "InterfacesRemoved", "oas", [path, list(interfaces)])

    def unexport_tree(self, path: str) -> None:
        """Remove ``path`` and everything below it, deepest first (as BlueZ does)."""
        prefix = path + "/"
        for child in sorted((p for p in self._objects if p.startswith(prefix)), key=len, reverse=True):
            self.unexport(child)
        self.unexport(path)

    def has_object(self, path: str) -> bool:
        return path in self._objects

    def emit_properties_changed(
        self,
        path: str,
        interface_name: str,
        changed: Mapping[str, Variant],
        invalidated: Sequence[str] = (),
    ) -> None:
        body = [interface_name, dict(changed), list(invalidated)]
        self._emit(path, PROPERTIES, "PropertiesChanged", "sa{sv}as", body)

    def _emit(self, path: str, interface: str, member: str, signature: str, body: list[Any]) -> None:
        if not self._bus.connected:
            return
        self._bus.send(Message.new_signal(path, interface, member, signature, body))

    # ------------------------------------------------------------------ incoming messages

    def add_signal_handler(self, handler: SignalHandler) -> None:
        """Receive every signal this connection gets (after the tree has looked at it)."""
        self._signal_handlers.append(handler)

    def _on_message(self, message: Message) -> bool | None:
        if message.message_type == MessageType.SIGNAL:
            for handler in self._signal_handlers:
                try:
                    handler(message)
                except Exception:
                    logger.exception("signal handler failed on %s.%s", message.interface, message.member)
            return None
        if message.message_type != MessageType.METHOD_CALL:
            return None  # replies go to dbus-fast's own waiters
        if message.interface == PEER:
            return None  # dbus-fast answers Ping and GetMachineId
        task = asyncio.get_running_loop().create_task(self._answer(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _answer(self, message: Message) -> None:
        result: MethodResult | None = None
        reply: Message
        try:
            signature, result = await self._dispatch(message)
            reply = Message.new_method_return(message, signature, list(result.body), list(result.unix_fds))
        except BluezError as error:
            reply = Message.new_error(message, error.name, error.text)
        except Exception as error:  # never let a bad call take the emulator down
            logger.exception("%s.%s on %s failed", message.interface, message.member, message.path)
            reply = Message.new_error(message, errors.ERROR_PREFIX + "Failed", f"internal error: {error}")
        try:
            if not message.flags & MessageFlag.NO_REPLY_EXPECTED and self._bus.connected:
                await self._bus.send(reply)
        except Exception:
            logger.debug("could not send the reply to %s.%s", message.interface, message.member)
        finally:
            if result is not None:
                for fd in result.unix_fds:
                    os.close(fd)

    async def _dispatch(self, message: Message) -> tuple[str, MethodResult]:
        path = message.path or "/"
        interfaces = self._objects.get(path)
        if interfaces is None and path != "/":
            raise BluezError(errors.UNKNOWN_OBJECT, f"Object {path} does not exist")
        interfaces = interfaces or {}
        member = message.member or ""
        match message.interface:
            case "org.freedesktop.DBus.Introspectable" if member == "Introspect" and not message.signature:
                return "s", MethodResult(body=[self.introspect(path)])
            case "org.freedesktop.DBus.Properties":
                return await self._properties_call(interfaces, message)
            case "org.freedesktop.DBus.ObjectManager" if path == "/" and member == "GetManagedObjects":
                if message.signature:
                    raise _unknown_method(message)
                return "a{oa{sa{sv}}}", MethodResult(body=[self.managed_objects()])
        interface = self._find_interface(interfaces, message)
        method = interface.METHODS[member]
        call = MethodCall(
            sender=message.sender or "",
            path=path,
            interface=interface.NAME,
            member=member,
            args=message.body,
            unix_fds=message.unix_fds,
        )
        return method.out_signature, await interface.call(call)

    def _find_interface(self, interfaces: Mapping[str, DBusInterface], message: Message) -> DBusInterface:
        member = message.member or ""
        candidates = (
            ([interfaces[message.interface]] if message.interface in interfaces else [])
            if message.interface
            else list(interfaces.values())
        )
        for interface in candidates:
            method = interface.METHODS.get(member)
            if method is not None and method.in_signature == message.signature:
                return interface
        raise _unknown_method(message)

    async def _properties_call(
        self, interfaces: Mapping[str, DBusInterface], message: Message
    ) -> tuple[str, MethodResult]:
        member, signature, body = message.member, message.signature, message.body
        if member == "GetAll" and signature == "s":
            return "a{sv}", MethodResult(body=[self._get_interface(interfaces, body[0]).properties()])
        if member == "Get" and signature == "ss":
            value = self._get_interface(interfaces, body[0]).properties().get(body[1])
            if value is None:
                raise BluezError(errors.INVALID_ARGS, f"No such property '{body[1]}'")
            return "v", MethodResult(body=[value])
        if member == "Set" and signature == "ssv":
            interface = self._get_interface(interfaces, body[0])
            name, value = body[1], body[2]
            current = interface.properties().get(name)
            if current is None:
                raise BluezError(errors.INVALID_ARGS, f"No such property '{name}'")
            if name not in interface.writable_properties():
                raise BluezError(errors.PROPERTY_READ_ONLY, f"Property '{name}' is not writable")
            if value.signature != current.signature:
                raise errors.invalid_arguments()
            await interface.set_property(name, value)
            return "", EMPTY_RESULT
        raise _unknown_method(message)

    @staticmethod
    def _get_interface(interfaces: Mapping[str, DBusInterface], name: str) -> DBusInterface:
        interface = interfaces.get(name)
        if interface is None:
            raise BluezError(errors.INVALID_ARGS, f"No such interface '{name}'")
        return interface

    # ------------------------------------------------------------------ views

    def managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        return {
            path: {name: interface.properties() for name, interface in interfaces.items()}
            for path, interfaces in self._objects.items()
            if interfaces
        }

    def introspect(self, path: str) -> str:
        parts = [_INTROSPECT_DOCTYPE, "<node>\n", _STANDARD_XML]
        if path == "/":
            parts.append(_OBJECT_MANAGER_XML)
        for interface in self._objects.get(path, {}).values():
            parts.append(_interface_xml(interface))
        for child in self._children(path):
            parts.append(f"  <node name={quoteattr(child)}/>\n")
        parts.append("</node>\n")
        return "".join(parts)

    def _children(self, path: str) -> list[str]:
        prefix = "/" if path == "/" else path + "/"
        children = {
            other[len(prefix) :].split("/", 1)[0]
            for other in self._objects
            if other.startswith(prefix) and other != path
        }
        return sorted(children)

    async def close(self) -> None:
        """Shutting down: stop answering and cancel the calls and jobs in flight."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def run_soon(self, coroutine: Awaitable[None], *, what: str) -> None:
        """Run a background job tied to this tree, logging (never raising) its failure."""

        async def guarded() -> None:
            try:
                await coroutine
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.closing:
                    logger.debug("%s failed during shutdown", what, exc_info=True)
                else:
                    logger.exception("%s failed", what)

        if self.closing:
            if inspect.iscoroutine(coroutine):
                coroutine.close()  # not run, and not reported as never awaited
            return
        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _unknown_method(message: Message) -> BluezError:
    return BluezError(
        errors.UNKNOWN_METHOD,
        f'Method "{message.member}" with signature "{message.signature}" on interface '
        f'"{message.interface}" doesn\'t exist',
    )


def _interface_xml(interface: DBusInterface) -> str:
    lines = [f"  <interface name={quoteattr(interface.NAME)}>\n"]
    for name, method in interface.METHODS.items():
        args = "".join(
            f'<arg name={quoteattr(arg_name)} type={quoteattr(arg_type)} direction="in"/>'
            for arg_name, arg_type in method.in_args
        ) + "".join(
            f'<arg name={quoteattr(arg_name)} type={quoteattr(arg_type)} direction="out"/>'
            for arg_name, arg_type in method.out_args
        )
        lines.append(f"    <method name={quoteattr(name)}>{args}</method>\n")
    lines.append(interface.SIGNALS_XML)
    writable = interface.writable_properties()
    for name, value in interface.properties().items():
        access = "readwrite" if name in writable else "read"
        lines.append(
            f'    <property name={quoteattr(name)} type={quoteattr(value.signature)} access="{access}"/>\n'
        )
    lines.append("  </interface>\n")
    return "".join(lines)
