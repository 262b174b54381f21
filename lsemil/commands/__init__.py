"""The `lsemil` commands: argparse (or absl flags) and a `main(argv) -> int` each.

Command modules sit on top: they import library modules (`lsemil.*`, `lsemil.data.*`) and
nothing imports them but `lsemil.cli`. Errors a user can fix are `lsemil.errors.UserError`s,
printed by `lsemil.cli` as one line.
"""
