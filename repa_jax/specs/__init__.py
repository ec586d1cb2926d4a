"""The bottom layer: what a config means, as frozen dataclasses and pure functions of the config (no networks, no
data): the model's shape (`model`), what a run needs from its feature dataset (`data`), how arrays lie on the devices
(`sharding`) and the random streams (`rng`). Every other package may import these; they import only `config`."""
