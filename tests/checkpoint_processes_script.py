"""A restore on several JAX processes, for tests/test_checkpoint_processes.py.

python tests/checkpoint_processes_script.py COORDINATOR PROCESS_ID NUM_PROCESSES RUN_DIR OUT_DIR

Restores RUN_DIR's newest good checkpoint of ``{"w": float32[8]}`` (replicated over every process's
device) as a training run does, setting a damaged step aside; process 1 waits 3 s before it hashes
a file, so that a process 1 that verified on its own would do so after process 0 moved the step.
Each process writes OUT_DIR/restore-<process>.json: the step restored, its ``w`` and the files it hashed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main() -> None:
    address, process, count, run_dir, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    import jax

    jax.distributed.initialize(address, num_processes=count, process_id=process)
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from jaxtune.training import checkpoint, checkpoint_integrity

    hashed: list[str] = []
    sha256 = checkpoint_integrity._sha256

    def counted(path: Path) -> str:
        if process == 1 and not hashed:
            time.sleep(3)
        hashed.append(str(path.relative_to(Path(run_dir) / "checkpoints")))
        return sha256(path)

    checkpoint_integrity._sha256 = counted
    replicated = NamedSharding(Mesh(np.asarray(jax.devices()), ("d",)), PartitionSpec())
    like = {"w": jax.ShapeDtypeStruct((8,), np.float32, sharding=replicated)}
    with checkpoint.Checkpointer(run_dir, with_data=False, report=print) as ckpt:
        step, got, *_ = ckpt.restore(like, {})
    w = np.asarray(got["w"].addressable_data(0)).tolist()
    (Path(out) / f"restore-{process}.json").write_text(json.dumps({"step": step, "w": w, "hashed": hashed}))


if __name__ == "__main__":
    main()
