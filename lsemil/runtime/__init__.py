"""Where a run lives: `sharding` (device mesh, shardings, multi-host helpers) and
`checkpointing` (Orbax checkpoints of training runs, and loading one for inference).
"""
