"""The small supervised networks the project trains for itself on Fashion-MNIST, cached in a directory (`params.npz`
+ `encoder.json`) and loaded from there afterwards (the images come from the caller: `load_split`):
- the REPA target (arch 'vit'): a ViT whose final-LayerNorm patch tokens REPA aligns to. REPA aligns a SiT block with
  a frozen pretrained encoder (DINOv2-B on ImageNet); for the embedded dataset no such encoder can be downloaded.
- the evaluation classifier (arch 'cnn', `models/cnn.py`): the feature network of FD and class accuracy.

Preprocessing (`PREPROCESSING`): uint8 / 255, then (x - 0.2860) / 0.3530 (the Fashion-MNIST train mean / std).
"""
import dataclasses
import functools
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from repa_jax.models.cnn import CNN, CNNSpec
from repa_jax.models.vit import ViT, ViTSpec

MEAN, STD = 0.2860, 0.3530
PREPROCESSING = f"uint8 / 255, then (x - {MEAN}) / {STD} (Fashion-MNIST train mean / std)"
PARAMS_FILE, INFO_FILE = "params.npz", "encoder.json"
Spec = ViTSpec | CNNSpec
ARCHS: dict[str, type[Spec]] = {"vit": ViTSpec, "cnn": CNNSpec}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Architecture and training run of a network: arch 'vit' (patch, width, depth, num_heads, mlp_ratio, pool) or
  'cnn' (stage_channels, convs_per_stage).

  The ViT defaults (10 epochs of 60000 images) reach 88.1% Fashion-MNIST test accuracy in ~16 min on one busy CPU
  core; 3 epochs (steps=5625) give ~84-85% in ~5 min. Wider or deeper ViTs learn little faster per second on a CPU.
  """
  arch: str = "vit"
  patch: int = 4
  width: int = 64
  depth: int = 2
  num_heads: int = 2
  mlp_ratio: float = 2.0
  pool: str = "mean"
  stage_channels: tuple[int, ...] = (32, 64, 128)
  convs_per_stage: int = 1
  steps: int = 18750
  batch: int = 32
  lr: float = 2e-3
  warmup_steps: int = 100
  weight_decay: float = 0.05
  flip: bool = True  # random horizontal flips
  seed: int = 0

  def spec(self, image_shape: tuple[int, int, int], num_classes: int) -> Spec:
    h, w, c = image_shape
    if self.arch not in ARCHS:
      raise ValueError(f"EncoderConfig.arch={self.arch!r}: use one of {sorted(ARCHS)}")
    if self.arch == "cnn":
      return CNNSpec(image_size=(h, w), channels=c, stage_channels=self.stage_channels, num_classes=num_classes,
                     convs_per_stage=self.convs_per_stage)
    return ViTSpec(image_size=(h, w), channels=c, patch=self.patch, depth=self.depth, width=self.width,
                   num_heads=self.num_heads, num_classes=num_classes, mlp_ratio=self.mlp_ratio, pool=self.pool)


def network(spec: Spec, rngs: nnx.Rngs) -> ViT | CNN:
  """The network of a spec: images [B, H, W, C] -> {'patch_tokens': [B, N, width], 'pooled': [B, D] (the head's
  input), 'logits': [B, classes]}."""
  return CNN(spec, rngs) if isinstance(spec, CNNSpec) else ViT(spec, rngs)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 [B, H, W, C] -> float32 [B, H, W, C], see PREPROCESSING."""
  return (images.astype(jnp.float32) / 255.0 - MEAN) / STD


def _check_images(images, labels=None) -> None:
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"encoder images must be uint8 [N, H, W, C]; got {images.dtype} {tuple(images.shape)}")
  if labels is not None and (labels.ndim != 1 or len(labels) != len(images)):
    raise ValueError(f"labels must be [N] with N = {len(images)} images; got shape {tuple(labels.shape)}")


def train_encoder(images: np.ndarray, labels: np.ndarray, config: EncoderConfig = EncoderConfig(), *,
                  num_classes: int | None = None, log_every: int = 0) -> tuple[Spec, nnx.State]:
  """Supervised training (AdamW, warm-up + cosine lr, cross-entropy on the pooled token) from scratch.

  images: uint8 [N, H, W, C]; labels: int [N] in [0, num_classes). Each step draws the batch from a per-epoch
  permutation (NumPy, seeded); flips use `fold_in(key, step)`. Returns the spec and its float32 parameters.
  """
  _check_images(images, labels)
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels span {labels.min()}..{labels.max()}, outside 0..{num_classes - 1} (num_classes)")
  spec = config.spec(images.shape[1:], num_classes)
  graphdef, params = nnx.split(network(spec, nnx.Rngs(config.seed)), nnx.Param)
  schedule = optax.warmup_cosine_decay_schedule(0.0, config.lr, min(config.warmup_steps, config.steps // 2),
                                                  max(config.steps, 1))
  tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  rng = np.random.default_rng(config.seed)
  epochs = -(-config.steps * config.batch // len(images))
  order = np.concatenate([rng.permutation(len(images)) for _ in range(epochs)])
  flip_key = jax.random.key(config.seed)

  def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)["logits"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits.argmax(-1) == y).mean()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, images, labels, step):
    x = preprocess(images)
    if config.flip:
      flip = jax.random.bernoulli(jax.random.fold_in(flip_key, step), 0.5, (len(x), 1, 1, 1))
      x = jnp.where(flip, x[:, :, ::-1], x)
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, {"loss": loss, "accuracy": accuracy}

  opt_state, start = tx.init(params), time.time()
  for step in range(config.steps):
    batch = order[step * config.batch:(step + 1) * config.batch]
    params, opt_state, metrics = train_step(params, opt_state, images[batch], labels[batch].astype(np.int32), step)
    if log_every and (step + 1) % log_every == 0:
      print(f"encoder step {step + 1}/{config.steps}: loss {float(metrics['loss']):.4f} "
            f"accuracy {float(metrics['accuracy']):.3f} ({time.time() - start:.0f} s)", flush=True)
  return spec, params


@functools.lru_cache(maxsize=8)
def _forward(spec: Spec):
  """Jitted (params, uint8 images) -> ViT outputs; one compiled function per spec (and input shape)."""
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: network(spec, nnx.Rngs(0))))
  return jax.jit(lambda params, images: nnx.merge(graphdef, params)(preprocess(images)))


def make_encode_fn(spec: Spec, params: nnx.State):
  """`encode(uint8 [B, H, W, C]) -> {'patch_tokens': [B, N, width], 'pooled': [B, D], 'logits': [B, classes]}`,
  float32 (see `network`)."""
  forward = _forward(spec)

  def encode(images):
    _check_images(images)
    if tuple(images.shape[1:]) != (*spec.image_size, spec.channels):
      raise ValueError(f"encoder expects images [B, {spec.image_size[0]}, {spec.image_size[1]}, {spec.channels}]; "
                       f"got {tuple(images.shape)}")
    return forward(params, images)
  return encode


def evaluate_accuracy(spec: Spec, params: nnx.State, images: np.ndarray, labels: np.ndarray,
                      batch: int = 500) -> float:
  """Top-1 accuracy of the encoder's head on uint8 images [N, H, W, C] with int labels [N]."""
  _check_images(images, labels)
  encode = make_encode_fn(spec, params)
  correct = sum(int((np.asarray(encode(images[i:i + batch])["logits"]).argmax(-1) == labels[i:i + batch]).sum())
                for i in range(0, len(images), batch))
  return correct / len(images)


def save_params(path: epath.PathLike, params: nnx.State) -> None:
  """Parameters as an .npz keyed by their tree paths."""
  flat = {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  with epath.Path(path).open("wb") as file:
    np.savez(file, **flat)


def load_params(path: epath.PathLike, spec: Spec) -> nnx.State:
  """Parameters of a network(spec) from `save_params`; missing keys or wrong shapes fail with the offending key."""
  abstract = nnx.state(nnx.eval_shape(lambda: network(spec, nnx.Rngs(0))), nnx.Param)
  with epath.Path(path).open("rb") as file, np.load(file) as stored:
    def load(path, leaf):
      key = jax.tree_util.keystr(path)
      if key not in stored or stored[key].shape != leaf.shape:
        raise ValueError(f"{path}: parameter {key} of shape {leaf.shape} is missing or has another shape "
                         f"({stored[key].shape if key in stored else 'absent'}); the file does not match {spec}.")
      return jnp.asarray(stored[key], leaf.dtype)
    return jax.tree_util.tree_map_with_path(load, abstract)


def load_or_train_encoder(cache_dir: epath.PathLike, config: EncoderConfig, *, name: str,
                          load_split: Callable[[str], tuple[np.ndarray, np.ndarray]], log_every: int = 1000):
  """(encode_fn, info) of the Fashion-MNIST network cached in `cache_dir/name`, trained there first if absent on
  `load_split('train')` (uint8 images [N, 28, 28, 1], int labels [N]) and scored on `load_split('test')`.

  encode_fn: uint8 [B, 28, 28, 1] -> {'patch_tokens': [B, 49, width], 'pooled': [B, D], 'logits': [B, 10]} float32.
  info: name, width, tokens, token_grid, test_accuracy, preprocessing, config, train_seconds.
  A cache written with another EncoderConfig is refused (delete it or pick another `name`).
  """
  folder = epath.Path(cache_dir) / name
  if (folder / INFO_FILE).exists():
    info = json.loads((folder / INFO_FILE).read_text())
    requested = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples -> lists, as stored
    if info["config"] != requested:
      raise ValueError(f"encoder cache {folder} was trained with config {info['config']}, not the requested "
                       f"{requested}. Fix: delete {folder} or pass another name.")
    spec = ARCHS[config.arch](**info["spec"])
    params = load_params(folder / PARAMS_FILE, spec)
  else:
    images, labels = load_split("train")
    start = time.time()
    spec, params = train_encoder(images, labels, config, num_classes=10, log_every=log_every)
    train_seconds = time.time() - start
    test_images, test_labels = load_split("test")
    info = {"name": name, "width": spec.width, "tokens": spec.num_tokens, "token_grid": list(spec.grid),
            "test_accuracy": evaluate_accuracy(spec, params, test_images, test_labels),
            "preprocessing": PREPROCESSING, "train_seconds": round(train_seconds, 1),
            "config": dataclasses.asdict(config), "spec": dataclasses.asdict(spec)}
    folder.mkdir(parents=True, exist_ok=True)
    save_params(folder / PARAMS_FILE, params)
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2))  # written last: its presence marks a full cache
    info = json.loads((folder / INFO_FILE).read_text())  # the same info a later call loads (lists, not tuples)
  return make_encode_fn(spec, params), info
