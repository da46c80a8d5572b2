"""A small LoRA training run as a script: the resume (SIGKILL) and multi-process tests run it.

python tests/train_script.py --model DIR --data FILE --run DIR --steps N [--save-every K]
    [--kill-at S [--kill-on P]] [--interrupt-at S [--interrupt-on P] [--twice]]
    [--fail-at S [--fail-on P] [--fail-after SECONDS]] [--batch B]
    [--interrupt-in restore|base|final [--interrupt-on P]] [--scores]
    [--log-every N] [--out FILE.npz]
    [--no-packing] [--eval-out FILE.json] [--eval-data FILE] [--generate-out FILE.json]
    [--slow-save SECONDS [--slow-save-on P]] [--then-run DIR]
    [--coordinator HOST:PORT --process-id I --num-processes P [--heartbeat-timeout SECONDS]
     [--shutdown-timeout SECONDS]]

Exits with 130 when the run stopped (a Ctrl-C), as ``jaxtune train`` does.

``--kill-at`` SIGKILLs the process (``--kill-on``: that one alone) after that step, writing
``killed at <time.time()>`` to stderr first. ``--interrupt-at`` sends process ``--interrupt-on`` a Ctrl-C
(SIGINT) as soon as its host has started that step, whatever ``--log-every`` (``--twice``: two).
``--interrupt-in`` sends it one Ctrl-C as it starts restoring the latest checkpoint, scoring the base model
or scoring the trained model (outside the step loop a Ctrl-C stops at once); ``--scores`` scores both
(``eval.before``, ``eval.after``; off otherwise).
``--fail-at`` raises in a callback of process ``--fail-on`` after that step, ``--fail-after`` seconds late.
``--slow-save`` keeps each save of process ``--slow-save-on`` (default 0) in flight that many seconds longer.
``--then-run`` starts a fresh run in DIR, with the same options but no ``--out``, in this process once the
first one ended: the SIGKILL test resumes one run and starts the next one it kills in one process, not two
(each process start is seconds of imports).

``--eval-out`` evaluates the trained model on the data (one pass, choice accuracy over the
answers' first letters) and writes the metrics; ``--generate-out`` writes the trained model's greedy
and sampled continuations of three fixed prompts (generated where the run's params are sharded).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--save-every", type=int, default=None)
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--kill-on", type=int, default=None, help="the process that --kill-at kills (default: every one)")
    ap.add_argument("--interrupt-at", type=int, default=None, help="one process alone gets a Ctrl-C after this step")
    ap.add_argument("--interrupt-on", type=int, default=0, help="the process that --interrupt-at interrupts")
    ap.add_argument("--twice", action="store_true", help="--interrupt-at sends two Ctrl-Cs (stop at once)")
    ap.add_argument("--interrupt-in", choices=("restore", "base", "final"), default=None,
                    help="process --interrupt-on gets a Ctrl-C as it starts this, outside the step loop")
    ap.add_argument("--scores", action="store_true", help="score the base model and the trained one")
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--fail-at", type=int, default=None, help="one process alone raises in a callback after this step")
    ap.add_argument("--fail-on", type=int, default=1, help="the process that --fail-at raises on")
    ap.add_argument("--fail-after", type=float, default=0,
                    help="seconds --fail-at waits before it raises (the other processes go on into the next step)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-packing", action="store_true", help="one example per row (padding mode)")
    ap.add_argument("--eval-out", default=None)
    ap.add_argument("--eval-data", default=None, help="the evaluation's rows (default: --data)")
    ap.add_argument("--generate-out", default=None)
    ap.add_argument("--coordinator", default=None)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--heartbeat-timeout", type=int, default=None, help="distributed.heartbeat_timeout_s")
    ap.add_argument("--shutdown-timeout", type=int, default=None,
                    help="jax.distributed's shutdown_timeout_seconds (JAX's default: 300)")
    ap.add_argument("--slow-save", type=float, default=None,
                    help="seconds process --slow-save-on's saves wait before they finish (a save still in flight)")
    ap.add_argument("--slow-save-on", type=int, default=0)
    ap.add_argument("--then-run", default=None, help="after this run, a fresh one in this directory (no --out)")
    args = ap.parse_args()

    import jax

    if args.shutdown_timeout is not None:  # how long a process leaving jax.distributed waits for the others
        import functools

        jax.distributed.initialize = functools.partial(jax.distributed.initialize,
                                                       shutdown_timeout_seconds=args.shutdown_timeout)
    if args.coordinator:  # as a recipe's distributed section would
        from jaxtune.config import DistributedConfig
        from jaxtune.recipe import setup_runtime
        from jaxtune.training.sharding import MeshConfig

        setup_runtime(MeshConfig(), DistributedConfig(coordinator_address=args.coordinator,
                                                      num_processes=args.num_processes, process_id=args.process_id,
                                                      heartbeat_timeout_s=args.heartbeat_timeout))
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    import numpy as np
    from flax.traverse_util import flatten_dict

    from jaxtune import tuning
    from jaxtune.data import LoaderConfig, make_loader, read_source
    from jaxtune.data.testing import tiny_tokenizer
    from jaxtune.models import hf
    from jaxtune.training.config import CheckpointConfig, EvalConfig, TrainConfig
    from jaxtune.training.optim import OptimizerConfig
    from jaxtune.training.trainer import Trainer

    if args.slow_save is not None and jax.process_index() == args.slow_save_on:
        # Orbax's background save thread (not public API): it sleeps before it waits for the other processes'
        # threads at its barrier, as a slow disk would keep it
        from orbax.checkpoint._src.checkpointers import async_checkpointer

        commit = async_checkpointer._background_wait_for_commit_futures

        def slow_commit(*a: Any, **k: Any) -> Any:
            time.sleep(args.slow_save)
            return commit(*a, **k)

        async_checkpointer._background_wait_for_commit_futures = slow_commit
    def kill(trainer: Trainer, step: int, metrics: dict) -> None:
        if step == args.kill_at and args.kill_on in (None, jax.process_index()):
            trainer.checkpointer.wait()  # the save of an earlier step is on disk; now die hard
            print(f"killed at {time.time()}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if step == args.fail_at and jax.process_index() == args.fail_on:
            time.sleep(args.fail_after)
            raise ValueError(f"a callback's error on process {args.fail_on} only, at step {step}")

    # The answers are upper-cased words; their first letters tell them apart.
    choices = tuple(w.upper() for w in ("alpha", "beta", "gamma", "delta", "omega", "kappa"))

    def interrupt_in(phase: str) -> None:
        if args.interrupt_in == phase and jax.process_index() == args.interrupt_on:
            os.kill(os.getpid(), signal.SIGINT)

    class Interrupted(Trainer):
        """A Ctrl-C right after the host started step ``--interrupt-at`` (callbacks run at log steps only), or as
        it starts ``--interrupt-in``'s phase."""

        def _resume(self, *a: Any, **k: Any) -> Any:
            interrupt_in("restore")
            return super()._resume(*a, **k)

        def evaluate(self, *a: Any, **k: Any) -> Any:
            interrupt_in("final" if self.step else "base")  # the loop evaluates only with eval.every (not set)
            return super().evaluate(*a, **k)

        def _one_step(self, *a: Any, **k: Any) -> Any:
            metrics = super()._one_step(*a, **k)
            if args.interrupt_at is not None:
                # Each host waits for its step: between log steps a host may run steps ahead of the others, and
                # the processes stop at the first step none has started (with all dispatched, the run's end).
                jax.block_until_ready(metrics)
            if self.step == args.interrupt_at and jax.process_index() == args.interrupt_on:
                for _ in range(2 if args.twice else 1):
                    os.kill(os.getpid(), signal.SIGINT)
            return metrics

    for run_dir, out in ((args.run, args.out), *([(args.then_run, None)] if args.then_run else [])):
        model = hf.load_pretrained(args.model)
        tuned = tuning.apply_plan(model, tuning.lora(rank=4, alpha=8) + tuning.train("norm"),
                                  tokenizer=tiny_tokenizer())
        loader = make_loader(read_source(args.data, "chat"), tiny_tokenizer(),
                             LoaderConfig(batch_size=args.batch, max_length=64, num_epochs=None, seed=0,
                                          packing=not args.no_packing), scan_first=False)
        eval_loader = make_loader(read_source(args.eval_data or args.data, "chat"), tiny_tokenizer(),
                                  LoaderConfig(batch_size=args.batch, max_length=64, num_epochs=1, shuffle=False,
                                               drop_remainder=False, packing=not args.no_packing), scan_first=False)
        trainer = Interrupted(tuned, train_data=loader, eval_data=eval_loader,
                          optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=2),
                          config=TrainConfig(steps=args.steps, log_every=args.log_every, progress=False),
                          checkpoint=CheckpointConfig(every=args.save_every),
                          eval=EvalConfig(choices=choices, before=args.scores, after=args.scores, cache_base=False),
                          run_dir=run_dir, callbacks=[kill] if args.kill_at or args.fail_at else [])
        try:
            result = trainer.fit()
        except KeyboardInterrupt:  # a Ctrl-C outside the step loop: as jaxtune train ends
            print("jaxtune: interrupted", file=sys.stderr)
            sys.exit(130)
        if out and jax.process_index() == 0:
            host = jax.device_get(trainer.trainable)  # gathers across processes for fully addressable arrays
            np.savez(out, **{"/".join(k): np.asarray(v) for k, v in flatten_dict(host).items()})
        if args.eval_out:
            metrics = trainer.evaluate()
            if jax.process_index() == 0:
                import json

                with open(args.eval_out, "w") as fh:
                    json.dump(metrics, fh)
        if args.generate_out:
            import json

            from jaxtune.models.generate import generate

            prompts = [tiny_tokenizer()(text)["input_ids"] for text in ("alpha beta", "omega", "kappa delta gamma")]
            tokens: dict = {mode: generate(trainer.tuned.module, trainer.params, prompts, max_new_tokens=6, **kwargs)
                            for mode, kwargs in (("greedy", {}), ("sampled", dict(temperature=1.0, top_k=20, seed=1)))}
            try:  # each process asks for another number of tokens: refused on every process, by name
                generate(trainer.tuned.module, trainer.params, prompts, max_new_tokens=2 + jax.process_index())
            except ValueError as err:
                tokens["different_requests"] = str(err)
            if jax.process_index() == 0:
                with open(args.generate_out, "w") as fh:
                    json.dump(tokens, fh)
        print(f"done step={result.step} state={result.state}", file=sys.stderr)
        if result.state == "stopped":  # as jaxtune train exits (the status of a process another one's Ctrl-C ends)
            sys.exit(130)


if __name__ == "__main__":
    # A Ctrl-C as a terminal's `jaxtune train` gets it. A process started with SIGINT ignored (every child of a
    # background job of a non-interactive shell, as CI may run the tests) keeps it ignored, and Python then
    # installs no KeyboardInterrupt handler: outside the step loop (restore, scoring) the test's Ctrl-C was lost.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    main()
