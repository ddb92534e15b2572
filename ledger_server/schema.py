"""The database tables (SQLAlchemy Core). Alembic migrations in `migrations/` create them.

Money is integer fen, energy integer Wh, time integer seconds since 1970 UTC. Exactly-once rests
on the keys here, not on checks in memory: one row per (box, sequence) ledger entry, one journal
transaction per idempotency key, one charge per (grant, box, session), one invoice line per session.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigSerial = BigInteger().with_variant(Integer(), "sqlite")

BoxId = String(16)
Fen = BigInteger
Seconds = BigInteger

# --- people ----------------------------------------------------------------------------------------

users = Table(
    "users",
    metadata,
    Column("user_id", Integer, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    # "phone:<number>" for a shared user, "account:<number>" for an electricity-account user.
    Column("login", String(48), nullable=False, unique=True),
    Column("phone", String(32), nullable=False),
    Column("electricity_account", String(32), nullable=True),
    Column("created_at", Seconds, nullable=False),
)

staff = Table(
    "staff",
    metadata,
    Column("staff_id", Integer, primary_key=True, autoincrement=True),
    Column("username", String(64), nullable=False, unique=True),
    Column("password_hash", String(200), nullable=False),
    Column("role", String(16), nullable=False),
    Column("created_at", Seconds, nullable=False),
)

one_time_codes = Table(
    "one_time_codes",
    metadata,
    Column("code_id", BigSerial, primary_key=True, autoincrement=True),
    Column("login", String(48), nullable=False),
    Column("code_hash", LargeBinary(32), nullable=False),
    Column("created_at", Seconds, nullable=False),
    Column("expires_at", Seconds, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("used", Boolean, nullable=False, default=False),
    Index("ix_one_time_codes_login_created", "login", "created_at"),
)

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("token_hash", LargeBinary(32), primary_key=True),
    Column("principal_kind", String(8), nullable=False),
    Column("principal_id", String(32), nullable=False),
    Column("role", String(16), nullable=False),
    Column("expires_at", Seconds, nullable=False, index=True),
)

box_challenges = Table(
    "box_challenges",
    metadata,
    Column("nonce", LargeBinary(32), primary_key=True),
    Column("box_id", BoxId, nullable=False),
    Column("expires_at", Seconds, nullable=False, index=True),
)

devices = Table(
    "devices",
    metadata,
    Column("public_key", LargeBinary(32), primary_key=True),
    Column("owner_kind", String(8), nullable=False),
    Column("owner_id", Integer, nullable=False),
    Column("registered_at", Seconds, nullable=False),
    Index("ix_devices_owner", "owner_kind", "owner_id"),
)

# --- money: a double-entry journal -----------------------------------------------------------------

accounts = Table(
    "accounts",
    metadata,
    Column("account_id", String(48), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("user_id", Integer, nullable=True, index=True),
    Column("box_id", BoxId, nullable=True),
    # Cached sum of the transfers in minus out; `journal.check_books` proves it against them.
    Column("balance_fen", Fen, nullable=False, default=0),
    CheckConstraint("kind NOT IN ('available', 'frozen') OR balance_fen >= 0", name="held_not_negative"),
    CheckConstraint("kind <> 'arrears' OR balance_fen <= 0", name="arrears_not_positive"),
)

journal_transactions = Table(
    "journal_transactions",
    metadata,
    # The idempotency key: what this money movement is for (e.g. "charge:<grant>:<box>:<session>").
    Column("transaction_key", String(120), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("user_id", Integer, nullable=True, index=True),
    Column("grant_id", LargeBinary(8), nullable=True, index=True),
    Column("box_id", BoxId, nullable=True),
    Column("session_id", LargeBinary(8), nullable=True),
    Column("created_at", Seconds, nullable=False),
)

journal_transfers = Table(
    "journal_transfers",
    metadata,
    Column("transfer_id", BigSerial, primary_key=True, autoincrement=True),
    Column(
        "transaction_key", String(120), ForeignKey("journal_transactions.transaction_key"), nullable=False
    ),
    Column("source_account", String(48), ForeignKey("accounts.account_id"), nullable=False, index=True),
    Column("destination_account", String(48), ForeignKey("accounts.account_id"), nullable=False, index=True),
    Column("amount_fen", Fen, nullable=False),
    CheckConstraint("amount_fen > 0", name="positive"),
    CheckConstraint("source_account <> destination_account", name="two_accounts"),
    Index("ix_journal_transfers_transaction", "transaction_key"),
)

payments = Table(
    "payments",
    metadata,
    Column("payment_id", BigSerial, primary_key=True, autoincrement=True),
    Column("idempotency_key", String(120), nullable=False, unique=True),
    Column("user_id", Integer, nullable=False, index=True),
    Column("kind", String(16), nullable=False),
    Column("amount_fen", Fen, nullable=False),
    Column("provider_reference", String(64), nullable=False),
    Column("created_at", Seconds, nullable=False),
)

# --- grants, reservations, tokens ------------------------------------------------------------------

grants = Table(
    "grants",
    metadata,
    Column("grant_id", LargeBinary(8), primary_key=True),
    Column("request_key", String(120), nullable=False, unique=True),
    Column("user_id", Integer, nullable=False, index=True),
    Column("phone_key", LargeBinary(32), nullable=False),
    Column("box_id", BoxId, nullable=True),
    Column("amount_fen", Fen, nullable=False),
    Column("max_price_fen_per_kwh", Integer, nullable=False),
    Column("max_session_seconds", Integer, nullable=False),
    Column("issued_at", Seconds, nullable=False),
    Column("expires_at", Seconds, nullable=False),
    Column("signed", LargeBinary, nullable=False),
    Column("state", String(16), nullable=False),
    Column("charged_fen", Fen, nullable=False, default=0),
    Column("captured_fen", Fen, nullable=False, default=0),
    Column("excess_fen", Fen, nullable=False, default=0),
    Column("released_fen", Fen, nullable=False, default=0),
    Column("closed_at", Seconds, nullable=True),
    Index("ix_grants_state_expires", "state", "expires_at"),
)

grant_charges = Table(
    "grant_charges",
    metadata,
    Column("grant_id", LargeBinary(8), ForeignKey("grants.grant_id"), primary_key=True),
    Column("box_id", BoxId, primary_key=True),
    Column("session_id", LargeBinary(8), primary_key=True),
    Column("user_id", Integer, nullable=False),
    Column("charge_fen", Fen, nullable=False),
    Column("captured_fen", Fen, nullable=False),
    Column("excess_fen", Fen, nullable=False),
    Column("created_at", Seconds, nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("reservation_id", LargeBinary(8), primary_key=True),
    Column("user_id", Integer, nullable=False, index=True),
    Column("box_id", BoxId, nullable=False),
    Column("outlet", Integer, nullable=False),
    Column("phone_key", LargeBinary(32), nullable=False),
    Column("not_before", Seconds, nullable=False),
    Column("expires_at", Seconds, nullable=False),
    Column("signed", LargeBinary, nullable=False),
    Index("ix_reservations_box_expires", "box_id", "expires_at"),
)

revocation_lists = Table(
    "revocation_lists",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("issued_at", Seconds, nullable=False),
    Column("signed", LargeBinary, nullable=False),
)

tariff_tables = Table(
    "tariff_tables",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("issued_at", Seconds, nullable=False),
    Column("signed", LargeBinary, nullable=False),
)

# --- boxes -----------------------------------------------------------------------------------------

boxes = Table(
    "boxes",
    metadata,
    Column("box_id", BoxId, primary_key=True),
    Column("public_key", LargeBinary(32), nullable=False, unique=True),
    Column("latitude_microdeg", BigInteger, nullable=False),
    Column("longitude_microdeg", BigInteger, nullable=False),
    Column("tariff_region", String(32), nullable=False),
    Column("certificate", LargeBinary, nullable=False),
    Column("certificate_expires_at", Seconds, nullable=False),
    Column("provisioned_at", Seconds, nullable=False),
    Column("last_seen_at", Seconds, nullable=True),
)

box_outlets = Table(
    "box_outlets",
    metadata,
    Column("box_id", BoxId, ForeignKey("boxes.box_id"), primary_key=True),
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("rated_power_w", Integer, nullable=False),
    Column("available", Boolean, nullable=True),
    # Box time of the newest fact behind `available` (an uplink report or a ledger entry).
    Column("availability_at", Seconds, nullable=True),
)

box_ledgers = Table(
    "box_ledgers",
    metadata,
    Column("box_id", BoxId, ForeignKey("boxes.box_id"), primary_key=True),
    # Entries 1..contiguous_sequence are stored, verified and chained; those above wait for a gap.
    Column("contiguous_sequence", BigInteger, nullable=False, default=0),
    Column("contiguous_hash", LargeBinary(32), nullable=False),
    # Entries 1..applied_sequence have had their effects (sessions, money) applied, exactly once.
    Column("applied_sequence", BigInteger, nullable=False, default=0),
    Column("applied_time", Seconds, nullable=False, default=0),
    Column("ack", LargeBinary, nullable=True),
)

ledger_entries = Table(
    "ledger_entries",
    metadata,
    Column("box_id", BoxId, ForeignKey("boxes.box_id"), primary_key=True),
    Column("sequence", BigInteger, primary_key=True, autoincrement=False),
    Column("entry_hash", LargeBinary(32), nullable=False),
    Column("previous_hash", LargeBinary(32), nullable=False),
    Column("time", Seconds, nullable=False),
    Column("kind", Integer, nullable=False),
    Column("signed", LargeBinary, nullable=False),
    Column("received_at", Seconds, nullable=False),
)

sessions = Table(
    "sessions",
    metadata,
    Column("box_id", BoxId, primary_key=True),
    Column("session_id", LargeBinary(8), primary_key=True),
    Column("outlet", Integer, nullable=False),
    Column("user_id", Integer, nullable=False),
    Column("phone_key", LargeBinary(32), nullable=False),
    Column("start_time", Seconds, nullable=False),
    Column("start_register_wh", BigInteger, nullable=False),
    Column("tariff_version", Integer, nullable=False),
    Column("price_fen_per_kwh", Integer, nullable=False),
    Column("started_sequence", BigInteger, nullable=False),
    Column("end_time", Seconds, nullable=True),
    Column("energy_wh", BigInteger, nullable=True),
    Column("claimed_cost_fen", Fen, nullable=True),
    Column("cost_fen", Fen, nullable=True),
    Column("end_reason", Integer, nullable=True),
    Column("ended_sequence", BigInteger, nullable=True),
    Index("ix_sessions_user", "user_id", "end_time"),
    Index("ix_sessions_end_time", "end_time"),
)

session_grants = Table(
    "session_grants",
    metadata,
    Column("box_id", BoxId, primary_key=True),
    Column("session_id", LargeBinary(8), primary_key=True),
    Column("grant_id", LargeBinary(8), primary_key=True),
    Column("position", Integer, nullable=False),
    Index("ix_session_grants_grant", "grant_id"),
)

box_commands = Table(
    "box_commands",
    metadata,
    Column("command_id", BigSerial, primary_key=True, autoincrement=True),
    Column("box_id", BoxId, ForeignKey("boxes.box_id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("outlet", Integer, nullable=False),
    Column("session_id", LargeBinary(8), nullable=True),
    Column("created_by", Integer, nullable=False),
    Column("created_at", Seconds, nullable=False),
    Column("completed_at", Seconds, nullable=True),
    Column("result", String(16), nullable=True),
    Column("detail", String(200), nullable=True),
    Index("ix_box_commands_box_open", "box_id", "completed_at"),
)

anomalies = Table(
    "anomalies",
    metadata,
    Column("anomaly_id", BigSerial, primary_key=True, autoincrement=True),
    Column("kind", String(24), nullable=False, index=True),
    # One anomaly per fact, however many times it is seen (e.g. "fork:<box>:<sequence>:<hash>").
    Column("dedup_key", String(200), nullable=False, unique=True),
    Column("box_id", BoxId, nullable=True, index=True),
    Column("sequence", BigInteger, nullable=True),
    Column("grant_id", LargeBinary(8), nullable=True),
    Column("user_id", Integer, nullable=True),
    Column("detail", String(400), nullable=False),
    Column("evidence", LargeBinary, nullable=True),
    Column("created_at", Seconds, nullable=False),
    Column("resolved_at", Seconds, nullable=True),
)

# --- statements and invoices -----------------------------------------------------------------------

invoices = Table(
    "invoices",
    metadata,
    Column("invoice_id", BigSerial, primary_key=True, autoincrement=True),
    Column("number", String(32), nullable=False, unique=True),
    Column("user_id", Integer, nullable=False, index=True),
    Column("created_at", Seconds, nullable=False),
    Column("total_fen", Fen, nullable=False),
    Column("energy_wh", BigInteger, nullable=False),
    Column("html", Text, nullable=False),
)

invoice_lines = Table(
    "invoice_lines",
    metadata,
    # A session is invoiced at most once.
    Column("box_id", BoxId, primary_key=True),
    Column("session_id", LargeBinary(8), primary_key=True),
    Column("invoice_id", BigInteger, nullable=False, index=True),
    Column("cost_fen", Fen, nullable=False),
    Column("energy_wh", BigInteger, nullable=False),
    ForeignKeyConstraint(["box_id", "session_id"], ["sessions.box_id", "sessions.session_id"]),
)

# --- the development payment provider's pretend electricity accounts -------------------------------

dev_electricity_accounts = Table(
    "dev_electricity_accounts",
    metadata,
    Column("account_number", String(32), primary_key=True),
    Column("password_hash", String(200), nullable=False),
    Column("phone", String(32), nullable=False),
)
