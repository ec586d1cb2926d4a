"""A network as a pure function plus its weights, so that `jit` takes the weights as arguments (not as compile-time
constants)."""
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
from flax import nnx


class Network(NamedTuple):
  """`apply(params, inputs) -> outputs`, with its parameters as a separate pytree (jit arguments)."""
  apply: Callable[[Any, jax.Array], Any]
  params: Any


def as_network(model: nnx.Module, fn: Callable[[nnx.Module, jax.Array], Any]) -> Network:
  """The Network of `fn(model, inputs)`: the model split into its graph and its state (the params)."""
  graphdef, state = nnx.split(model)
  return Network(lambda state, inputs: fn(nnx.merge(graphdef, state), inputs), state)
