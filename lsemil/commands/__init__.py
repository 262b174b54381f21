"""The `lsemil` commands: argparse (or absl flags) and a `main(argv) -> int` each.

Command modules sit on top: they import library modules (`lsemil.*`, `lsemil.data.*`) and
nothing imports them but `lsemil.commands.cli`. Errors a user can fix are `lsemil.core.errors.UserError`s,
printed by `lsemil.commands.cli` as one line.
"""
