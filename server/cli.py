"""The ``fedmer`` console script: one command, its subcommands gathered from the packages that do the work.

It lives in ``server`` because the server is the top of the dependency chain
(partitions -> models -> client -> server) and may import every layer.
"""

from __future__ import annotations

import typer

from partitions.cli import register as register_data_commands
from server.baselines import register as register_baselines
from server.simulate import register as register_simulation

app = typer.Typer(
    name="fedmer",
    help="Federated micro-expression recognition.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_data_commands(app)
register_simulation(app)
register_baselines(app)

if __name__ == "__main__":
    app()
