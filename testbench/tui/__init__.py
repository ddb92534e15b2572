"""`powerbox tui`: a test-bench TUI over the whole running system (docs/testbench.md).

`state` holds the frozen snapshot records and the actions, `bench` keeps a snapshot of a running
system up to date and carries actions out, `render` writes snapshots as text, `app` is the textual
screen and `cli` the `powerbox tui` command.
"""

from .app import BenchApp
from .bench import Bench, LiveBench, StaticBench
from .state import Action, ActionKind, BenchState

__all__ = ["Action", "ActionKind", "Bench", "BenchApp", "BenchState", "LiveBench", "StaticBench"]
