"""The training objectives, each a short module of pure functions: flow, alignment (REPA), dispersive."""
