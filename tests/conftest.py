"""Shared test set-up: 8 simulated CPU devices and absl flags for grain workers."""
import os

# Must happen before jax is imported anywhere: sharding tests need 8 devices.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

# grain worker processes read absl flags; unparsed flags crash them (NOTES.md).
flags.FLAGS.mark_as_parsed()
