"""`python -m ledger_server ...` is `powerbox server ...`."""

from ledger_server.cli import server

if __name__ == "__main__":  # not when a worker process imports this module as its main
    server()
