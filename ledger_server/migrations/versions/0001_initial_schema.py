"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "access_tokens",
        sa.Column("token_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("principal_kind", sa.String(length=8), nullable=False),
        sa.Column("principal_id", sa.String(length=32), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_access_tokens")),
    )
    op.create_index(op.f("ix_access_tokens_expires_at"), "access_tokens", ["expires_at"], unique=False)
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(length=48), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("box_id", sa.String(length=16), nullable=True),
        sa.Column("balance_fen", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "kind <> 'arrears' OR balance_fen <= 0", name=op.f("ck_accounts_arrears_not_positive")
        ),
        sa.CheckConstraint(
            "kind NOT IN ('available', 'frozen') OR balance_fen >= 0",
            name=op.f("ck_accounts_held_not_negative"),
        ),
        sa.PrimaryKeyConstraint("account_id", name=op.f("pk_accounts")),
    )
    op.create_index(op.f("ix_accounts_user_id"), "accounts", ["user_id"], unique=False)
    op.create_table(
        "anomalies",
        sa.Column(
            "anomaly_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=24), nullable=False),
        sa.Column("dedup_key", sa.String(length=200), nullable=False),
        sa.Column("box_id", sa.String(length=16), nullable=True),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("grant_id", sa.LargeBinary(length=8), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.String(length=400), nullable=False),
        sa.Column("evidence", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("resolved_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("anomaly_id", name=op.f("pk_anomalies")),
        sa.UniqueConstraint("dedup_key", name=op.f("uq_anomalies_dedup_key")),
    )
    op.create_index(op.f("ix_anomalies_box_id"), "anomalies", ["box_id"], unique=False)
    op.create_index(op.f("ix_anomalies_kind"), "anomalies", ["kind"], unique=False)
    op.create_table(
        "box_challenges",
        sa.Column("nonce", sa.LargeBinary(length=32), nullable=False),
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("nonce", name=op.f("pk_box_challenges")),
    )
    op.create_index(op.f("ix_box_challenges_expires_at"), "box_challenges", ["expires_at"], unique=False)
    op.create_table(
        "boxes",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("latitude_microdeg", sa.BigInteger(), nullable=False),
        sa.Column("longitude_microdeg", sa.BigInteger(), nullable=False),
        sa.Column("tariff_region", sa.String(length=32), nullable=False),
        sa.Column("certificate", sa.LargeBinary(), nullable=False),
        sa.Column("certificate_expires_at", sa.BigInteger(), nullable=False),
        sa.Column("provisioned_at", sa.BigInteger(), nullable=False),
        sa.Column("last_seen_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("box_id", name=op.f("pk_boxes")),
        sa.UniqueConstraint("public_key", name=op.f("uq_boxes_public_key")),
    )
    op.create_table(
        "dev_electricity_accounts",
        sa.Column("account_number", sa.String(length=32), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint("account_number", name=op.f("pk_dev_electricity_accounts")),
    )
    op.create_table(
        "devices",
        sa.Column("public_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("owner_kind", sa.String(length=8), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("registered_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("public_key", name=op.f("pk_devices")),
    )
    op.create_index("ix_devices_owner", "devices", ["owner_kind", "owner_id"], unique=False)
    op.create_table(
        "grants",
        sa.Column("grant_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("request_key", sa.String(length=120), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("phone_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("box_id", sa.String(length=16), nullable=True),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("max_price_fen_per_kwh", sa.Integer(), nullable=False),
        sa.Column("max_session_seconds", sa.Integer(), nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("charged_fen", sa.BigInteger(), nullable=False),
        sa.Column("captured_fen", sa.BigInteger(), nullable=False),
        sa.Column("excess_fen", sa.BigInteger(), nullable=False),
        sa.Column("released_fen", sa.BigInteger(), nullable=False),
        sa.Column("closed_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("grant_id", name=op.f("pk_grants")),
        sa.UniqueConstraint("request_key", name=op.f("uq_grants_request_key")),
    )
    op.create_index("ix_grants_state_expires", "grants", ["state", "expires_at"], unique=False)
    op.create_index(op.f("ix_grants_user_id"), "grants", ["user_id"], unique=False)
    op.create_table(
        "invoices",
        sa.Column(
            "invoice_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("number", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("total_fen", sa.BigInteger(), nullable=False),
        sa.Column("energy_wh", sa.BigInteger(), nullable=False),
        sa.Column("html", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("invoice_id", name=op.f("pk_invoices")),
        sa.UniqueConstraint("number", name=op.f("uq_invoices_number")),
    )
    op.create_index(op.f("ix_invoices_user_id"), "invoices", ["user_id"], unique=False)
    op.create_table(
        "journal_transactions",
        sa.Column("transaction_key", sa.String(length=120), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("grant_id", sa.LargeBinary(length=8), nullable=True),
        sa.Column("box_id", sa.String(length=16), nullable=True),
        sa.Column("session_id", sa.LargeBinary(length=8), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("transaction_key", name=op.f("pk_journal_transactions")),
    )
    op.create_index(
        op.f("ix_journal_transactions_grant_id"), "journal_transactions", ["grant_id"], unique=False
    )
    op.create_index(
        op.f("ix_journal_transactions_user_id"), "journal_transactions", ["user_id"], unique=False
    )
    op.create_table(
        "one_time_codes",
        sa.Column(
            "code_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("login", sa.String(length=48), nullable=False),
        sa.Column("code_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("used", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("code_id", name=op.f("pk_one_time_codes")),
    )
    op.create_index(
        "ix_one_time_codes_login_created", "one_time_codes", ["login", "created_at"], unique=False
    )
    op.create_table(
        "payments",
        sa.Column(
            "payment_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("idempotency_key", sa.String(length=120), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.Column("provider_reference", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("payment_id", name=op.f("pk_payments")),
        sa.UniqueConstraint("idempotency_key", name=op.f("uq_payments_idempotency_key")),
    )
    op.create_index(op.f("ix_payments_user_id"), "payments", ["user_id"], unique=False)
    op.create_table(
        "reservations",
        sa.Column("reservation_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("outlet", sa.Integer(), nullable=False),
        sa.Column("phone_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("not_before", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("reservation_id", name=op.f("pk_reservations")),
    )
    op.create_index("ix_reservations_box_expires", "reservations", ["box_id", "expires_at"], unique=False)
    op.create_index(op.f("ix_reservations_user_id"), "reservations", ["user_id"], unique=False)
    op.create_table(
        "revocation_lists",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_revocation_lists")),
    )
    op.create_table(
        "session_grants",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("grant_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("box_id", "session_id", "grant_id", name=op.f("pk_session_grants")),
    )
    op.create_index("ix_session_grants_grant", "session_grants", ["grant_id"], unique=False)
    op.create_table(
        "sessions",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("outlet", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("phone_key", sa.LargeBinary(length=32), nullable=False),
        sa.Column("start_time", sa.BigInteger(), nullable=False),
        sa.Column("start_register_wh", sa.BigInteger(), nullable=False),
        sa.Column("tariff_version", sa.Integer(), nullable=False),
        sa.Column("price_fen_per_kwh", sa.Integer(), nullable=False),
        sa.Column("started_sequence", sa.BigInteger(), nullable=False),
        sa.Column("end_time", sa.BigInteger(), nullable=True),
        sa.Column("energy_wh", sa.BigInteger(), nullable=True),
        sa.Column("claimed_cost_fen", sa.BigInteger(), nullable=True),
        sa.Column("cost_fen", sa.BigInteger(), nullable=True),
        sa.Column("end_reason", sa.Integer(), nullable=True),
        sa.Column("ended_sequence", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("box_id", "session_id", name=op.f("pk_sessions")),
    )
    op.create_index("ix_sessions_end_time", "sessions", ["end_time"], unique=False)
    op.create_index("ix_sessions_user", "sessions", ["user_id", "end_time"], unique=False)
    op.create_table(
        "staff",
        sa.Column("staff_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("staff_id", name=op.f("pk_staff")),
        sa.UniqueConstraint("username", name=op.f("uq_staff_username")),
    )
    op.create_table(
        "tariff_tables",
        sa.Column("version", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("issued_at", sa.BigInteger(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("version", name=op.f("pk_tariff_tables")),
    )
    op.create_table(
        "users",
        sa.Column("user_id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("login", sa.String(length=48), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=False),
        sa.Column("electricity_account", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_users")),
        sa.UniqueConstraint("login", name=op.f("uq_users_login")),
    )
    op.create_table(
        "box_commands",
        sa.Column(
            "command_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("outlet", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.LargeBinary(length=8), nullable=True),
        sa.Column("created_by", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("completed_at", sa.BigInteger(), nullable=True),
        sa.Column("result", sa.String(length=16), nullable=True),
        sa.Column("detail", sa.String(length=200), nullable=True),
        sa.ForeignKeyConstraint(["box_id"], ["boxes.box_id"], name=op.f("fk_box_commands_box_id_boxes")),
        sa.PrimaryKeyConstraint("command_id", name=op.f("pk_box_commands")),
    )
    op.create_index("ix_box_commands_box_open", "box_commands", ["box_id", "completed_at"], unique=False)
    op.create_table(
        "box_ledgers",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("contiguous_sequence", sa.BigInteger(), nullable=False),
        sa.Column("contiguous_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("applied_sequence", sa.BigInteger(), nullable=False),
        sa.Column("applied_time", sa.BigInteger(), nullable=False),
        sa.Column("ack", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["box_id"], ["boxes.box_id"], name=op.f("fk_box_ledgers_box_id_boxes")),
        sa.PrimaryKeyConstraint("box_id", name=op.f("pk_box_ledgers")),
    )
    op.create_table(
        "box_outlets",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("number", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("rated_power_w", sa.Integer(), nullable=False),
        sa.Column("available", sa.Boolean(), nullable=True),
        sa.Column("availability_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["box_id"], ["boxes.box_id"], name=op.f("fk_box_outlets_box_id_boxes")),
        sa.PrimaryKeyConstraint("box_id", "number", name=op.f("pk_box_outlets")),
    )
    op.create_table(
        "grant_charges",
        sa.Column("grant_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("charge_fen", sa.BigInteger(), nullable=False),
        sa.Column("captured_fen", sa.BigInteger(), nullable=False),
        sa.Column("excess_fen", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.grant_id"], name=op.f("fk_grant_charges_grant_id_grants")
        ),
        sa.PrimaryKeyConstraint("grant_id", "box_id", "session_id", name=op.f("pk_grant_charges")),
    )
    op.create_table(
        "invoice_lines",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.LargeBinary(length=8), nullable=False),
        sa.Column("invoice_id", sa.BigInteger(), nullable=False),
        sa.Column("cost_fen", sa.BigInteger(), nullable=False),
        sa.Column("energy_wh", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["box_id", "session_id"],
            ["sessions.box_id", "sessions.session_id"],
            name=op.f("fk_invoice_lines_box_id_sessions"),
        ),
        sa.PrimaryKeyConstraint("box_id", "session_id", name=op.f("pk_invoice_lines")),
    )
    op.create_index(op.f("ix_invoice_lines_invoice_id"), "invoice_lines", ["invoice_id"], unique=False)
    op.create_table(
        "journal_transfers",
        sa.Column(
            "transfer_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("transaction_key", sa.String(length=120), nullable=False),
        sa.Column("source_account", sa.String(length=48), nullable=False),
        sa.Column("destination_account", sa.String(length=48), nullable=False),
        sa.Column("amount_fen", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount_fen > 0", name=op.f("ck_journal_transfers_positive")),
        sa.CheckConstraint(
            "source_account <> destination_account", name=op.f("ck_journal_transfers_two_accounts")
        ),
        sa.ForeignKeyConstraint(
            ["destination_account"],
            ["accounts.account_id"],
            name=op.f("fk_journal_transfers_destination_account_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["source_account"],
            ["accounts.account_id"],
            name=op.f("fk_journal_transfers_source_account_accounts"),
        ),
        sa.ForeignKeyConstraint(
            ["transaction_key"],
            ["journal_transactions.transaction_key"],
            name=op.f("fk_journal_transfers_transaction_key_journal_transactions"),
        ),
        sa.PrimaryKeyConstraint("transfer_id", name=op.f("pk_journal_transfers")),
    )
    op.create_index(
        op.f("ix_journal_transfers_destination_account"),
        "journal_transfers",
        ["destination_account"],
        unique=False,
    )
    op.create_index(
        op.f("ix_journal_transfers_source_account"), "journal_transfers", ["source_account"], unique=False
    )
    op.create_index(
        "ix_journal_transfers_transaction", "journal_transfers", ["transaction_key"], unique=False
    )
    op.create_table(
        "ledger_entries",
        sa.Column("box_id", sa.String(length=16), nullable=False),
        sa.Column("sequence", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("entry_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("previous_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("time", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.Integer(), nullable=False),
        sa.Column("signed", sa.LargeBinary(), nullable=False),
        sa.Column("received_at", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["box_id"], ["boxes.box_id"], name=op.f("fk_ledger_entries_box_id_boxes")),
        sa.PrimaryKeyConstraint("box_id", "sequence", name=op.f("pk_ledger_entries")),
    )


def downgrade() -> None:

    op.drop_table("ledger_entries")
    op.drop_index("ix_journal_transfers_transaction", table_name="journal_transfers")
    op.drop_index(op.f("ix_journal_transfers_source_account"), table_name="journal_transfers")
    op.drop_index(op.f("ix_journal_transfers_destination_account"), table_name="journal_transfers")
    op.drop_table("journal_transfers")
    op.drop_index(op.f("ix_invoice_lines_invoice_id"), table_name="invoice_lines")
    op.drop_table("invoice_lines")
    op.drop_table("grant_charges")
    op.drop_table("box_outlets")
    op.drop_table("box_ledgers")
    op.drop_index("ix_box_commands_box_open", table_name="box_commands")
    op.drop_table("box_commands")
    op.drop_table("users")
    op.drop_table("tariff_tables")
    op.drop_table("staff")
    op.drop_index("ix_sessions_user", table_name="sessions")
    op.drop_index("ix_sessions_end_time", table_name="sessions")
    op.drop_table("sessions")
    op.drop_index("ix_session_grants_grant", table_name="session_grants")
    op.drop_table("session_grants")
    op.drop_table("revocation_lists")
    op.drop_index(op.f("ix_reservations_user_id"), table_name="reservations")
    op.drop_index("ix_reservations_box_expires", table_name="reservations")
    op.drop_table("reservations")
    op.drop_index(op.f("ix_payments_user_id"), table_name="payments")
    op.drop_table("payments")
    op.drop_index("ix_one_time_codes_login_created", table_name="one_time_codes")
    op.drop_table("one_time_codes")
    op.drop_index(op.f("ix_journal_transactions_user_id"), table_name="journal_transactions")
    op.drop_index(op.f("ix_journal_transactions_grant_id"), table_name="journal_transactions")
    op.drop_table("journal_transactions")
    op.drop_index(op.f("ix_invoices_user_id"), table_name="invoices")
    op.drop_table("invoices")
    op.drop_index(op.f("ix_grants_user_id"), table_name="grants")
    op.drop_index("ix_grants_state_expires", table_name="grants")
    op.drop_table("grants")
    op.drop_index("ix_devices_owner", table_name="devices")
    op.drop_table("devices")
    op.drop_table("dev_electricity_accounts")
    op.drop_table("boxes")
    op.drop_index(op.f("ix_box_challenges_expires_at"), table_name="box_challenges")
    op.drop_table("box_challenges")
    op.drop_index(op.f("ix_anomalies_kind"), table_name="anomalies")
    op.drop_index(op.f("ix_anomalies_box_id"), table_name="anomalies")
    op.drop_table("anomalies")
    op.drop_index(op.f("ix_accounts_user_id"), table_name="accounts")
    op.drop_table("accounts")
    op.drop_index(op.f("ix_access_tokens_expires_at"), table_name="access_tokens")
    op.drop_table("access_tokens")
