"""The ``fedmer`` console script: one command, its subcommands gathered from the packages that do the work.

It lives in ``server`` because the server is the top of the dependency chain
(partitions -> models -> client -> server) and may import every layer.
"""

from __future__ import annotations

from client.runtime import apply_thread_env

apply_thread_env()  # OpenMP's wait policy: before anything imports torch

import typer  # noqa: E402

from partitions.cli import register as register_data_commands  # noqa: E402
from server.baselines import register as register_baselines  # noqa: E402
from server.simulate import register as register_simulation  # noqa: E402

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
