"""`powerbox box ...`: provision, run, label, status and ledger for a field technician."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import click
import segno
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.console import Console
from rich.table import Table

from box_peripheral.config import BoxConfig, ConfigError, load_config, write_private_key
from box_peripheral.store import BoxStore, StoreError
from protocol import cose, gatt, tokens
from protocol.errors import PowerboxError, TokenError

console = Console()


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: what log shippers and `jq` read best."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _load(config_path: Path) -> BoxConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise click.ClickException(exc.detail) from None


@click.group()
def box() -> None:
    """The box daemon and the technician's tools for it."""


@box.command()
@click.option("--box-id", required=True, help="Box id, 1-16 characters of A-Z, 0-9 and '-'.")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where to write box.key and provision-request.json.",
)
def provision(box_id: str, directory: Path) -> None:
    """Generate the box key and the request the operator signs into a certificate."""
    if not gatt.is_valid_box_id(box_id):
        raise click.BadParameter("use 1-16 characters of A-Z, 0-9 and '-'", param_hint="--box-id")
    directory.mkdir(parents=True, exist_ok=True)
    key_path = directory / "box.key"
    if key_path.exists():
        raise click.ClickException(f"{key_path} exists: a box key is never overwritten")
    key = Ed25519PrivateKey.generate()
    write_private_key(key_path, key)
    request = {"box_id": box_id, "public_key": cose.public_key_bytes(key.public_key()).hex()}
    request_path = directory / "provision-request.json"
    request_path.write_text(json.dumps(request, indent=2) + "\n")
    console.print(f"wrote {key_path} (keep it on the box) and {request_path} (give it to the operator)")
    console.print(
        "the operator returns box.cert; put it beside box.key and write box.toml (docs/operations.md)"
    )


@box.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--log-format", type=click.Choice(["json", "text"]), default="json", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
def run(config_path: Path, log_format: str, log_level: str) -> None:
    """Run the box daemon until SIGTERM or SIGINT."""
    from box_peripheral.daemon import run_box  # bless and the hardware drivers load only here

    config = _load(config_path)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLogFormatter() if log_format == "json" else logging.Formatter("%(levelname)s %(message)s")
    )
    logging.basicConfig(level=log_level.upper(), handlers=[handler], force=True)
    # every bus failure reaches the daemon as a HardwareError; pymodbus's own frame dumps are noise
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)

        def ready(_: object) -> None:
            print(json.dumps({"event": "ready", "box_id": config.certificate.box_id}), flush=True)

        await run_box(config, stop=stop, ready=ready)

    try:
        asyncio.run(main())
    except PowerboxError as exc:
        raise click.ClickException(f"{exc.code.name}: {exc.detail}") from None


def _label_svg(label: gatt.QrLabel) -> str:
    """A print-ready label: the QR code with the outlet number and box id under it."""
    code = segno.make(label.encode(), error="m")
    size = code.symbol_size(scale=8, border=4)[0]
    qr = code.svg_inline(scale=8, border=4)
    height = size + 90
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{height}" '
        f'viewBox="0 0 {size} {height}">'
        f'<rect width="100%" height="100%" fill="#fff"/>{qr}'
        f'<text x="{size // 2}" y="{size + 36}" font-family="sans-serif" font-size="30" text-anchor="middle">'
        f"Outlet {label.outlet}</text>"
        f'<text x="{size // 2}" y="{size + 70}" font-family="sans-serif" font-size="18" text-anchor="middle">'
        f"{label.box_id} - scan to plug in</text></svg>\n"
    )


@box.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("labels"), show_default=True
)
def label(config_path: Path, out: Path) -> None:
    """Write a QR label per outlet, as PNG and as print-ready SVG."""
    config = _load(config_path)
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = gatt.box_key_fingerprint(cose.public_key_bytes(config.certificate.box_public_key))
    for outlet in config.certificate.outlets:
        qr_label = gatt.QrLabel(
            box_id=config.certificate.box_id, outlet=outlet.number, fingerprint=fingerprint
        )
        stem = out / f"{config.certificate.box_id}-outlet-{outlet.number}"
        segno.make(qr_label.encode(), error="m").save(f"{stem}.png", scale=10, border=4)
        Path(f"{stem}.svg").write_text(_label_svg(qr_label))
        console.print(f"outlet {outlet.number}: {qr_label.encode()} -> {stem}.png, {stem}.svg")


async def _status(config: BoxConfig) -> dict[str, Any]:
    async with BoxStore.open(
        config.database, box_id=config.certificate.box_id, box_key=config.box_key
    ) as store:
        running = await store.running_sessions()
        revocations = await store.setting("revocation_list")
        table = await store.setting("tariff_table")
        return {
            "box_id": config.certificate.box_id,
            "outlets": [o.number for o in config.certificate.outlets],
            "running_sessions": [
                {
                    "session_id": s.session_id.hex(),
                    "outlet": s.outlet,
                    "energy_wh": s.energy_wh,
                    "balance_fen": s.balance_fen,
                    "since": s.start_time,
                }
                for s in running
            ],
            "last_sequence": await store.last_sequence(),
            "acked_sequence": await store.acked_sequence(),
            "revocation_version": None
            if revocations is None
            else tokens.RevocationList.decode_unverified(revocations).version,
            "tariff_version": None if table is None else tokens.TariffTable.decode_unverified(table).version,
        }


@box.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(config_path: Path, as_json: bool) -> None:
    """What the box holds: running sessions, ledger position, versions."""
    config = _load(config_path)
    try:
        result = asyncio.run(_status(config))
    except StoreError as exc:
        raise click.ClickException(exc.detail) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    console.print(f"box {result['box_id']}, outlets {result['outlets']}")
    console.print(
        f"ledger: last entry {result['last_sequence']}, acknowledged up to {result['acked_sequence']}"
    )
    console.print(f"revocation list v{result['revocation_version']}, tariff v{result['tariff_version']}")
    table = Table("session", "outlet", "energy (Wh)", "balance (fen)")
    for s in result["running_sessions"]:
        table.add_row(s["session_id"], str(s["outlet"]), str(s["energy_wh"]), str(s["balance_fen"]))
    console.print(table if result["running_sessions"] else "no running sessions")


async def _entries(config: BoxConfig) -> list[bytes]:
    async with BoxStore.open(
        config.database, box_id=config.certificate.box_id, box_key=config.box_key
    ) as store:
        return await store.entries(after=0, limit=1_000_000)


@box.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def ledger(config_path: Path, as_json: bool) -> None:
    """List the ledger and verify every signature and chain link; exits 1 if anything is wrong."""
    config = _load(config_path)
    ring = cose.key_ring(config.certificate.box_public_key)
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    previous: bytes | None = None
    previous_sequence: int | None = None
    for signed in asyncio.run(_entries(config)):
        try:
            entry = tokens.LedgerEntry.verify(signed, ring)
        except TokenError as exc:
            problems.append(f"entry after {previous_sequence}: {exc.code.name}")
            continue
        if previous is not None and (
            entry.previous_hash != previous or entry.sequence != (previous_sequence or 0) + 1
        ):
            problems.append(f"entry {entry.sequence}: chain broken")
        previous, previous_sequence = tokens.entry_hash(signed), entry.sequence
        rows.append(
            {
                "sequence": entry.sequence,
                "time": entry.time,
                "quality": entry.time_quality.name,
                "kind": entry.kind.name,
                "body": repr(entry.body),
            }
        )
    if as_json:
        click.echo(json.dumps({"entries": rows, "problems": problems}, indent=2))
    else:
        table = Table("#", "time", "kind", "details")
        for row in rows:
            table.add_row(str(row["sequence"]), str(row["time"]), row["kind"], row["body"][:100])
        console.print(table)
        console.print(f"[green]{len(rows)} entries, chain verified" if not problems else f"[red]{problems}")
    if problems:
        sys.exit(1)


@box.command()
@click.argument("state", type=click.Choice(["on", "off"]))
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), required=True)
def uplink(state: str, config_path: Path) -> None:
    """Switch the 4G uplink on or off at run time (off simulates the link going down)."""
    from box_peripheral.uplink import off_switch_path

    config = _load(config_path)
    switch = off_switch_path(config.database)
    if state == "off":
        switch.touch()
    else:
        switch.unlink(missing_ok=True)
    console.print(f"uplink {state}")
