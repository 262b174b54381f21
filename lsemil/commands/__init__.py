"""The top layer: the `lsemil` commands, one module per verb (`train`, `evaluate`, ...).

Each parses its arguments (argparse, or absl flags) and has a `main(argv) -> int`; `cli`
dispatches and `arguments` holds the shared options. Nothing imports a command but `cli`.
Errors a user can fix are `lsemil.core.errors.UserError`s, which `cli` prints as one line.
"""
