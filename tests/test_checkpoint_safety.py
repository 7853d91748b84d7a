"""Opening a checkpoint never runs code, unless the user opts in for a PyTorch file.

A `.pth` whose pickle carries a `__reduce__` payload (`os.system("touch MARKER")`) next to
an ordinary state_dict goes through every entry point: the library, `evaluate
--torch_checkpoint`, training's `init_from`, `compare`. Oracles: the payload's own trace
(MARKER), Python's audit events (`os.system`, `pickle.find_class`, process creation: these
fire whatever the route to the code), and, for "before compilation", an empty JAX
compilation cache that every compiled program would be written to. Our orbax checkpoints
get the same payloads written into every JSON file they hold.
"""
import argparse
import contextlib
import json
import logging
import os
import pathlib
import pickle
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from fgc_jax import checkpointing, evaluate, evaluation, torch_import, train
from fgc_jax.models import cifar_resnet
from test_fidelity import reference_fgc_checkpoint
from test_torch_import import cifar_shapes, random_state_dict, template

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
SYSTEM = f"{os.system.__module__}.system"  # how the pickle names os.system ('posix.system')
CODE_EVENTS = ("os.system", "pickle.find_class", "subprocess.Popen", "os.exec", "os.posix_spawn",
               "os.spawn", "os.fork")
_AUDITED: list[list[tuple[str, tuple]]] = []  # the recordings in progress


def _audit(event, args):
    if _AUDITED and event in CODE_EVENTS:
        _AUDITED[-1].append((event, args))


sys.addaudithook(_audit)  # cannot be removed; records only inside `code_events()`


@contextlib.contextmanager
def code_events():
    """Records the audit events of code being looked up by a pickle or run as a process."""
    events: list[tuple[str, tuple]] = []
    _AUDITED.append(events)
    try:
        yield events
    finally:
        _AUDITED.remove(events)


class Payload:
    """Unpickles as `os.system('touch MARKER')`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def malicious_pth(path, marker, state_dict=None, **save_options):
    """An authors'-format checkpoint dict whose extra entry is the payload."""
    state_dict = state_dict or {"conv1.weight": torch.zeros(16, 3, 3, 3)}
    torch.save({"epoch": 7, "arch": "resnet8", "state_dict": state_dict, "hook": Payload(marker)},
               path, **save_options)
    return path


def tensors(state):
    return {k: torch.as_tensor(v) for k, v in state.items()}


# ----------------------------------------------------------------------------- the library
@pytest.mark.parametrize("layout", ["zip", "legacy", "inside_allowed_namespace"])
def test_library_refuses_a_pickle_that_names_code_and_runs_none(tmp_path, layout):
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pth"
    if layout == "inside_allowed_namespace":  # the allowlisted class vets what it holds
        torch.save({"state_dict": {}, "args": argparse.Namespace(lr=0.1, hook=Payload(marker))}, path)
    else:
        malicious_pth(path, marker, _use_new_zipfile_serialization=layout == "zip")
    readers = [lambda: torch_import.read_torch_checkpoint(path),
               lambda: torch_import.read_torch_state_dict(path),
               lambda: torch_import.load_torch_checkpoint(path, template(cifar_resnet(8)))]
    for read in readers:
        with code_events() as events, pytest.raises(torch_import.UnsafeCheckpointError) as error:
            read()
        message = str(error.value)
        assert "\n" not in message and str(path) in message and SYSTEM in message
        assert "trust_pickled_code=True" in message
        assert not marker.exists() and events == []


def test_training_refuses_init_from_before_writing_anything(tmp_path):
    marker, workdir = tmp_path / "MARKER", tmp_path / "run"
    config = quickstart.get_config()
    config.init_from = str(malicious_pth(tmp_path / "evil.pth", marker))
    with code_events() as events, pytest.raises(torch_import.UnsafeCheckpointError, match=SYSTEM):
        train.train_and_evaluate(config, str(workdir))
    assert not marker.exists() and events == [] and not workdir.exists()


def test_opting_in_runs_the_code_and_warns(tmp_path, caplog):
    marker = tmp_path / "MARKER"
    state = random_state_dict(cifar_shapes(8), seed=0)
    path = malicious_pth(tmp_path / "evil.pth", marker, tensors(state))
    with caplog.at_level(logging.WARNING), code_events() as events:
        variables = torch_import.load_torch_checkpoint(path, template(cifar_resnet(8)), trust_pickled_code=True)
    assert marker.exists()
    assert [os.fsdecode(args[0]) for event, args in events if event == "os.system"] == [
        f"touch {shlex.quote(str(marker))}"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(path) in w and "was run" in w and SYSTEM in w for w in warnings), warnings
    np.testing.assert_array_equal(variables["params"]["layer3_0"]["conv2"]["kernel"],
                                  state["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))


def test_released_and_authors_format_checkpoints_import_without_opting_in(bas_checkpoint, tmp_path, caplog):
    """The released BAS ResNet-20 and an FGC-stage file as the authors' scripts save it: `epoch`,
    `arch`, `best_acc1`, `state_dict` (with the memory banks), `optimizer`, and `args`, an
    argparse.Namespace (let through PyTorch's allowlist; no code runs)."""
    fgc = tmp_path / "fgc_epoch250.pth"
    banks = reference_fgc_checkpoint(bas_checkpoint, fgc)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(fgc) == ["argparse.Namespace"]
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(fgc, map_location="cpu", weights_only=True)
    assert {"epoch", "arch", "best_acc1", "state_dict", "optimizer", "args"} <= saved.keys()
    with caplog.at_level(logging.WARNING), code_events() as events:
        released, released_epoch = torch_import.read_torch_checkpoint(bas_checkpoint)
        stage, stage_epoch = torch_import.read_torch_checkpoint(fgc)
    assert events == [] and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert (released_epoch, stage_epoch) == (100, 250)
    model, found = torch_import.split_reference_banks(stage)
    assert sorted(found) == ["layer3.1", "layer3.2"]
    np.testing.assert_array_equal(found["layer3.2"]["gate"], banks["layer3.2.gate.gate_mb.memory"].numpy())
    assert model.keys() == released.keys()
    for key, value in released.items():
        np.testing.assert_array_equal(model[key], value)


# ----------------------------------------------------------------------------- the commands
def run_all(commands, env):
    """Runs the commands side by side; [(returncode, stderr lines without absl's I/W log lines)]."""
    processes = [subprocess.Popen([sys.executable, "-m", *c], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    for process in processes:
        _, stderr = process.communicate(timeout=300)
        results.append((process.returncode, stderr))
    return results


def error_lines(stderr):
    """stderr without absl's log lines and Python's warnings."""
    return [line for line in stderr.splitlines() if not re.match(r"[IW]\d{4} |<frozen runpy>", line)]


def test_every_command_refuses_it_with_one_line_before_compiling(tmp_path):
    marker = tmp_path / "MARKER"
    evil = malicious_pth(tmp_path / "evil.pth", marker)
    cache = tmp_path / "xla_cache"  # every program compiled would be written here
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("GLIBC_TUNABLES", None)
    config = "--config=configs/quickstart.py"
    commands = {
        "evaluate": ["fgc_jax.evaluate", config, f"--torch_checkpoint={evil}", f"--output_dir={tmp_path / 'eval'}"],
        "train": ["fgc_jax.main", config, f"--workdir={tmp_path / 'run'}", f"--config.init_from={evil}"],
        "compare": ["fgc_jax.compare", str(evil)],
    }
    results = dict(zip(commands, run_all(commands.values(), env)))
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "eval").exists()
    assert not cache.exists() or not any(cache.iterdir()), sorted(p.name for p in cache.iterdir())
    for name in ("evaluate", "train"):
        returncode, stderr = results[name]
        lines = error_lines(stderr)
        assert returncode == 2 and len(lines) == 1, (name, stderr)
        assert lines[0].startswith(f"error: {evil} names code") and SYSTEM in lines[0], (name, stderr)
        assert "--config.trust_pickled_code=True" in lines[0]
        assert lines[0].replace(str(evil), "evil.pth") in (REPO / "README.md").read_text()  # quoted there
    returncode, stderr = results["compare"]  # compare reads JSON reports only: the file is not one
    lines = error_lines(stderr)
    assert returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {evil} is not an eval report")


def test_evaluate_with_the_config_opt_in_runs_the_code_and_warns(tmp_path, caplog):
    marker = tmp_path / "MARKER"
    evil = malicious_pth(tmp_path / "evil.pth", marker)  # its state_dict is no ResNet-20
    config = quickstart.get_config()
    with pytest.raises(torch_import.UnsafeCheckpointError):
        evaluate.run_evaluation(config, str(tmp_path / "eval"), torch_checkpoint=str(evil))
    assert not marker.exists()
    config.trust_pickled_code = True
    with caplog.at_level(logging.WARNING), pytest.raises(evaluation.EvaluationError, match="seems to hold a"):
        evaluate.run_evaluation(config, str(tmp_path / "eval"), torch_checkpoint=str(evil))
    assert marker.exists()
    assert any(str(evil) in r.getMessage() and "was run" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------- our own checkpoints
def payloads(marker):
    """What a hand-edited JSON file could carry: a protocol-0 pickle (plain ASCII), the
    `__reduce__` of the payload, and jsonpickle's and PyYAML's spellings of a call."""
    command = f"touch {marker}"
    return {"pickle": pickle.dumps(Payload(marker), protocol=0).decode("ascii"),
            "__reduce__": [SYSTEM, [command]],
            "py/reduce": [{"py/function": SYSTEM}, {"py/tuple": [command]}],
            "yaml": f"!!python/object/apply:os.system [{command!r}]"}


def edit_json(path, edit):
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def save_checkpoints(workdir, config, steps):
    manager = checkpointing.create_manager(str(workdir), config)
    state = {"params": {"w": jnp.arange(3.0)}, "batch_stats": {"m": jnp.ones(2)}}
    for step in steps:
        checkpointing.save(manager, step, state, {"model": checkpointing.model_identity(config)}, {"top1": 0.5})
    checkpointing.wait(manager)
    manager.close()


ABSTRACT_STATE = {"params": {"w": jnp.zeros(3)}, "batch_stats": {"m": jnp.zeros(2)}}


def test_payloads_in_our_checkpoints_json_come_back_as_inert_values(tmp_path):
    """Payloads in every JSON file orbax and we write, where each file allows extra entries."""
    marker, config = tmp_path / "MARKER", quickstart.get_config()
    save_checkpoints(tmp_path, config, [2])
    planted, step = payloads(marker), tmp_path / "checkpoints" / "2"
    edit_json(step / "meta" / "metadata", lambda meta: dict(meta, **planted))
    edit_json(step / "metrics" / "metrics", lambda metrics: dict(metrics, **planted))
    edit_json(step / "_CHECKPOINT_METADATA", lambda m: dict(m, custom_metadata=planted))
    edit_json(step / "state" / "_METADATA", lambda m: dict(m, custom_metadata=planted))
    with code_events() as events:
        variables, restored_step = checkpointing.restore_model_variables(str(tmp_path))
        manager = checkpointing.create_manager(str(tmp_path), config)
        restored, meta = checkpointing.restore(manager, 2, ABSTRACT_STATE, config)
        manager.close()
    assert not marker.exists() and events == []
    assert restored_step == 2
    np.testing.assert_array_equal(variables["params"]["w"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(restored["batch_stats"]["m"], [1.0, 1.0])
    assert {k: meta[k] for k in planted} == planted


def outcome(restore):
    try:
        restore()
        return "restored"
    except Exception as e:  # pylint: disable=broad-except
        return type(e).__name__


def restore_for_training(workdir, config, step):
    manager = checkpointing.create_manager(str(workdir), config)
    try:
        return checkpointing.restore(manager, step, ABSTRACT_STATE, config)
    finally:
        manager.close()


# What each edit does to evaluation's and training's restore. The handler names in
# _CHECKPOINT_METADATA are only looked up (in orbax's registry, never imported) when the
# restore names no handler; ours always names them.
EDITS = {"meta_is_a_pickle": ["CorruptCheckpointError"] * 2, "handler_named_os_system": ["restored"] * 2,
         "unknown_keys": ["ValueError"] * 2}


@pytest.mark.parametrize("edit", EDITS)
def test_hand_edited_checkpoints_are_refused_or_restored_running_no_code(tmp_path, edit):
    marker, config = tmp_path / "MARKER", quickstart.get_config()
    save_checkpoints(tmp_path, config, [1])
    step = tmp_path / "checkpoints" / "1"
    if edit == "meta_is_a_pickle":
        (step / "meta" / "metadata").write_bytes(pickle.dumps({"model": Payload(marker)}))
    elif edit == "handler_named_os_system":
        edit_json(step / "_CHECKPOINT_METADATA",
                  lambda m: dict(m, item_handlers={name: SYSTEM for name in m["item_handlers"]}))
    else:  # orbax's own files allow extra entries under custom_metadata only
        for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
            edit_json(step / name, lambda m: dict(m, custom_metadata={"x": 1}, **payloads(marker)))
    with code_events() as events:
        outcomes = [outcome(lambda: checkpointing.restore_model_variables(str(tmp_path))),
                    outcome(lambda: restore_for_training(tmp_path, config, 1))]
    assert not marker.exists() and events == []
    assert outcomes == EDITS[edit]
