"""The ``jaxtune`` command end to end on a tiny random Llama: train -> status -> eval -> export
(PEFT and merged, loaded by peft/transformers) -> generate (greedy tokens equal transformers');
one-line errors with exit codes; Ctrl-C leaves a resumable, "stopped" run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import tiny_hf_model

from jaxtune.cli import main
from jaxtune.data.testing import tiny_tokenizer, write_jsonl

WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa"]


def chat_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.RandomState(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS, rng.randint(1, 4)))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": q.upper()}]})
    return rows


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny_hf_model("LlamaForCausalLM", root / "llama")
    tiny_tokenizer().save_pretrained(root / "llama")
    write_jsonl(root / "train.jsonl", chat_rows(64, 0))
    write_jsonl(root / "valid.jsonl", chat_rows(16, 1))
    config = {
        "model": {"path": str(root / "llama")},
        "plan": [{"preset": "lora", "rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}],
        "data": {"train": str(root / "train.jsonl"), "validation": str(root / "valid.jsonl"), "kind": "chat",
                 "max_length": 64, "batch_size": 8},
        "optimizer": {"learning_rate": 3e-2, "warmup_steps": 1},
        "train": {"steps": 6, "log_every": 2, "progress": False},
        "eval": {"every": 3, "best_metric": "loss"},
        "output": {"dir": str(root / "run")},
    }
    (root / "lora.yaml").write_text(yaml.safe_dump(config))
    return root


@pytest.fixture(scope="module")
def trained(assets):
    code, out, err = cli("train", assets / "lora.yaml")
    assert code == 0, err
    return assets / "run", out, err


def test_train_prints_plan_data_table_and_exports(trained):
    run_dir, out, err = trained
    assert "plan: trainable" in err and "frozen" in err
    assert "data: train" in err and "data: validation" in err and "step 6 validation" in err
    assert "| loss |" in out and "better" in out  # the before/after table, the loss went down
    assert (run_dir / "config.yaml").is_file() and (run_dir / "export" / "adapter_config.json").is_file()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optimizer"]["learning_rate"] == 3e-2 and saved["data"]["packing"] is None  # defaults in


def test_status_reports_a_finished_run_and_plots(trained, tmp_path):
    run_dir, _, _ = trained
    code, out, _ = cli("status", run_dir, "--json")
    info = json.loads(out)
    assert code == 0 and info["state"] == "finished" and info["step"] == info["total_steps"] == 6
    assert info["train"]["loss"] > 0 and info["eval"]["loss"] > 0 and info["tokens_per_s"] > 0
    assert info["best"]["step"] in (3, 6) and info["checkpoints"] == [6]
    code, out, _ = cli("status", run_dir, "--plot", tmp_path / "loss.png")
    assert code == 0 and "state:       finished" in out and "step:        6/6 (100%)" in out
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_rerunning_a_finished_run_trains_nothing(trained, assets):
    code, out, err = cli("train", assets / "lora.yaml", "eval.after=false", "output.export=none")
    assert code == 0 and "already trained to step 6" in err


def test_rerunning_a_finished_run_keeps_its_records(trained, assets):
    """The run's records stay as the run left them: metrics.jsonl gained a second final evaluation at
    step 6 on every rerun, and status.json lost its last training metrics (``train: {}``)."""
    run_dir = trained[0]
    records, status = (run_dir / "metrics.jsonl").read_text(), json.loads((run_dir / "status.json").read_text())
    code, out, err = cli("train", assets / "lora.yaml", "output.export=none")
    assert code == 0 and "already trained to step 6" in err and "| loss |" in out, err
    assert "evaluating the fine-tuned model" not in err  # scored on this data already (report.json)
    assert (run_dir / "metrics.jsonl").read_text() == records
    again = json.loads((run_dir / "status.json").read_text())
    assert {**again, "updated": None} == {**status, "updated": None} and again["train"]["loss"] > 0


def test_eval_compares_base_and_tuned(trained):
    run_dir, _, _ = trained
    code, out, err = cli("eval", run_dir, "--json")
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["step"] == 6 and result["tuned"]["loss"] < result["base"]["loss"]
    code, out, err = cli("eval", run_dir, "--best", "data.max_length=48")  # an override after a flag
    assert code == 0, err
    assert f"checkpoint step {json.loads(cli('status', run_dir, '--json')[1])['best']['step']}" in out
    assert "| loss |" in out and "better" in out  # the table, as train prints it


def test_opening_a_run_with_another_plan_is_refused_and_moves_nothing(trained):
    """The run's checkpoints are intact: a plan that does not fit them is the opener's error, not
    damage (they used to be moved aside as corrupt, and the next train started from step 0)."""
    run_dir, _, _ = trained
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    saved["plan"][0]["rank"] = 2
    (run_dir.parent / "rank2.yaml").write_text(yaml.safe_dump(saved))  # a recipe whose output.dir is the run
    for command in (("eval", run_dir, "plan.0.rank=2"), ("eval", run_dir.parent / "rank2.yaml")):
        code, _, err = cli(*command)
        assert code == 2 and "trained with another plan or labels" in err and "lora_a" in err, err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before


def test_run_directory_names_are_paths_not_yaml(trained, tmp_path):
    """'run #2' is not 'run' (YAML reads " #2" as a comment) and '2024' is not a number."""
    import shutil

    run_dir, _, _ = trained
    for name in ("run #2", "2024"):
        copy = tmp_path / name
        shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints", "best"))
        code, out, err = cli("eval", copy, "--json")
        assert code == 0, err
        assert json.loads(out.strip().splitlines()[-1])["step"] is None  # its own (empty) checkpoints, not run's


def test_export_never_mixes_two_exports_and_refuses_options_it_cannot_apply(trained, tmp_path):
    run_dir, _, _ = trained
    assert cli("export", run_dir, "--to", tmp_path / "out")[0] == 0
    assert cli("export", run_dir, "--to", tmp_path / "out")[0] == 0  # the same export again replaces it
    code, _, err = cli("export", run_dir, "--to", tmp_path / "out", "--merge")
    assert code == 1 and "holds an earlier peft export, and this one is merged" in err, err
    assert cli("export", run_dir, "--to", tmp_path / "out", "--merge", "--overwrite")[0] == 0
    assert (tmp_path / "out" / "config.json").is_file() and not (tmp_path / "out" / "adapter_config.json").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    code, _, err = cli("export", run_dir, "--to", tmp_path / "mine", "--overwrite")
    assert code == 1 and "not empty and not an earlier export" in err and (tmp_path / "mine" / "notes.txt").is_file()
    code, _, err = cli("export", run_dir, "--to", tmp_path / "half", "--dtype", "float16")
    assert code == 1 and "applies to merged exports" in err and not (tmp_path / "half").exists(), err


def test_export_gguf_refuses_a_tokenizer_llama_cpp_cannot_run_before_writing(trained, tmp_path):
    """--gguf reaches the GGUF export (its success is tests/test_gguf_export.py's, on byte-level BPE
    tokenizers): this run's character-level tokenizer has no GGUF form, and nothing is written."""
    run_dir, _, _ = trained
    code, _, err = cli("export", run_dir, "--to", tmp_path / "gguf", "--gguf", "--dtype", "q8_0")
    assert code == 1 and "a WordLevel tokenizer; the GGUF export writes byte-level BPE" in err, err
    assert not (tmp_path / "gguf").exists()
    code, _, err = cli("export", run_dir, "--to", tmp_path / "x", "--merge", "--dtype", "q8_0")
    assert code == 1 and "dtype q8_0: applies to GGUF exports" in err and not (tmp_path / "x").exists(), err


def test_best_is_refused_where_there_is_no_best_checkpoint(assets, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = cli("train", assets / "lora.yaml", f"output.dir={run_dir}", "train.steps=2", "eval.every=null",
                       "eval.best_metric=null", "output.export=none")
    assert code == 0, err
    code, _, err = cli("export", run_dir, "--best", "--to", tmp_path / "x")
    assert code == 1 and "no best checkpoint" in err and not (tmp_path / "x").exists(), err
    code, _, err = cli("generate", assets / "llama", "--prompt", "a", "--best")
    assert code == 2 and "not a run directory; drop --best" in err, err


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_step_is_the_step_train_and_status_name(assets, tmp_path):
    """An lr beyond float32's range makes step 1's update non-finite; the host reads the finite flags at
    step 5 (log_every), and train printed "training failed at step 5", status "step: 5/6". Both name
    step 1; status gives 0 as the last good step."""
    run_dir = tmp_path / "run"
    code, out, err = cli("train", assets / "lora.yaml", f"output.dir={run_dir}", "optimizer.learning_rate=1e39",
                         "train.log_every=5", "eval.every=null", "eval.best_metric=null", "eval.before=false",
                         "output.export=none")
    assert code == 1 and "step 1: the update made the params or optimizer state non-finite" in err, err
    assert "training failed at step 1 (see above)" in out, out
    code, out, _ = cli("status", run_dir)
    assert code == 0 and "step:        0/6 (0%), the last good step: step 1 was not finite" in out, out
    code, out, _ = cli("status", run_dir, "--json")
    assert {k: json.loads(out)[k] for k in ("state", "step", "failed_step")} == {"state": "failed", "step": 0,
                                                                                 "failed_step": 1}


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    from jaxtune.training.rundir import RunDirError

    with pytest.raises(RunDirError, match="no such run directory"):
        main(["status", str(tmp_path / "nope"), "--debug"])


def _hf_greedy(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=0)
    new = out[0, len(ids):].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stops), new)


def _generate(target, prompt: str, *extra: str) -> dict:
    code, out, err = cli("generate", target, "--prompt", prompt, "--max-new-tokens", "12", "--json", *extra)
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_generate_matches_transformers_greedy(assets):
    import transformers

    tokenizer = tiny_tokenizer()
    model = transformers.LlamaForCausalLM.from_pretrained(assets / "llama").eval()
    for prompt in ("gamma delta", "a"):
        ours = _generate(assets / "llama", prompt)
        assert ours["ids"] == _hf_greedy(model, tokenizer(prompt)["input_ids"], 12, [3, 2])
    chat = _generate(assets / "llama", "alpha beta", "--chat")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "alpha beta"}], add_generation_prompt=True,
                                        tokenize=False)
    assert chat["ids"] == _hf_greedy(model, tokenizer(ids, add_special_tokens=False)["input_ids"], 12, [3, 2])


def test_exports_load_in_peft_and_transformers_and_generate_the_same(trained, tmp_path):
    import peft
    import transformers

    run_dir, _, _ = trained
    tokenizer = tiny_tokenizer()
    prompt = "beta gamma"
    ids = tokenizer(prompt)["input_ids"]
    ours = _generate(run_dir, prompt)["ids"]  # the run's LoRA params, evaluated in place

    assert cli("export", run_dir, "--to", tmp_path / "adapter")[0] == 0
    base = transformers.LlamaForCausalLM.from_pretrained(run_dir.parent / "llama").eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert _hf_greedy(adapted, ids, 12, [3, 2]) == ours

    assert cli("export", run_dir, "--to", tmp_path / "merged", "--merge")[0] == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert _hf_greedy(merged, ids, 12, [3, 2]) == ours
    assert _generate(tmp_path / "merged", prompt)["ids"] == ours


@pytest.mark.parametrize("argv, code, expected", [
    (["train", "missing.yaml"], 2, "config error: missing.yaml: no such config file"),
    (["train", "{lora}", "optimizer.learning_rate=fast"], 2,
     "config error: optimizer.learning_rate: expected a number, got 'fast'"),
    (["train", "{lora}", "optimizr.name=sgd"], 2, "did you mean 'optimizer'?"),
    (["train", "{lora}", "data.train={root}/nope.jsonl"], 1, "nope.jsonl"),
    (["train", "{lora}", "plan=[{action: lora, blocks: 'last:9'}]"], 2, "the model has only 2 blocks"),
    (["train", "{lora}", "data.batch_size=6"], 2, "6 rows do not split over the mesh's 8-way data parallelism"),
    (["train", "{lora}", "eval.choices=[up, uh]"], 2,
     "eval.choices: 'up' and 'uh' begin with the same token ('u')"),
    (["train"], 2, "the following arguments are required: config"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["generate", "{root}/llama"], 2, "give --prompt"),
    (["generate", "{root}/llama", "--prompt", "x", "--top-p", "2"], 1, "top_p must be in (0, 1]"),
    (["generate", "{root}/llama", "--prompt", "x", "--system", "be brief"], 2, "--system is the chat template's"),
    (["eval", "{root}/nope"], 2, "nope: no such run directory or config file"),
    (["status", "{root}"], 1, "not a run directory"),
    (["export", "{root}/llama", "--to", "{root}/x"], 2, "not a run directory"),
    (["fetch", "gpt2"], 2, "unknown asset 'gpt2'"),
])
def test_bad_input_is_one_line_and_an_exit_code(assets, argv, code, expected):
    argv = [a.replace("{lora}", str(assets / "lora.yaml")).replace("{root}", str(assets)) for a in argv]
    got, out, err = cli(*argv, "output.dir=" + str(assets / "bad")) if argv[0] == "train" and len(argv) > 1 \
        else cli(*argv)
    lines = err.strip().splitlines()
    assert got == code, err
    assert lines[-1].startswith("jaxtune: error: ") and expected in lines[-1], err
    assert "Traceback" not in err


def test_fetch_lists_the_offline_assets():
    code, out, _ = cli("fetch")
    assert code == 0 and "all-MiniLM-L6-v2" in out and "SmolLM2-135M-Instruct" in out and "chatterbot" in out


def test_a_stderr_closed_after_an_earlier_call_does_not_break_the_next():
    """pytest closes each test's captured stderr; the CLI's log handler must not touch it again."""
    earlier = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # like pytest's capture (flush raises once closed)
    with contextlib.redirect_stderr(earlier), contextlib.redirect_stdout(io.StringIO()):
        assert main(["fetch"]) == 0
    earlier.close()
    code, out, err = cli("fetch")
    assert code == 0 and "all-MiniLM-L6-v2" in out, err


def test_ctrl_c_leaves_a_stopped_resumable_run(assets, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "jaxtune", "train", str(assets / "lora.yaml"),
                             f"output.dir={run_dir}", "train.steps=100000", "train.log_every=1", "eval.every=null",
                             "eval.best_metric=null"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text().strip():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "training never logged a step"
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "interrupted at step" in err
    status = json.loads((run_dir / "status.json").read_text())
    stopped_at = status["step"]
    assert status["state"] == "stopped" and stopped_at >= 1
    code, out, _ = cli("status", run_dir)
    assert code == 0 and "state:       stopped (interrupted" in out
    # Running it again resumes from the checkpoint (on this process's 8-device mesh) and finishes.
    code, out, err = cli("train", assets / "lora.yaml", f"output.dir={run_dir}", f"train.steps={stopped_at + 2}",
                         "eval.every=null", "eval.best_metric=null", "output.export=none")
    assert code == 0, err
    assert f"resumed from {run_dir / 'checkpoints' / str(stopped_at)}" in err
    assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_export_dtype_choices_are_the_librarys_list_and_parsing_imports_no_jax(tmp_path):
    """`jaxtune export --dtype` spelled the names out again (to keep jax out of the parser); it offers
    the one list the library checks dtypes against (jaxtune.dtypes), and parsing still imports no jax."""
    import argparse
    import typing

    import jaxtune
    from jaxtune.cli import build_parser
    from jaxtune.config import OutputConfig
    from jaxtune.dtypes import DTYPE_NAMES, GGUF_DTYPE_NAMES
    from jaxtune.models.load import DTYPES, dtype_name

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = next(a for a in commands.choices["export"]._actions if a.dest == "dtype").choices
    assert choices is GGUF_DTYPE_NAMES and GGUF_DTYPE_NAMES == (*DTYPE_NAMES, "q8_0")  # q8_0: --gguf only
    assert DTYPE_NAMES == typing.get_args(DTYPES)
    assert [dtype_name(name, "dtype") for name in DTYPE_NAMES] == list(DTYPE_NAMES)
    assert OutputConfig(export_dtype="float16").export_dtype == "float16"
    script = ("import sys; from jaxtune.cli import main; code = main(['export', '--help']); "
              "sys.exit(code or ('jax' in sys.modules and 'jax imported while parsing'))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(jaxtune.__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    assert "{float32,bfloat16,float16,q8_0}" in done.stdout
