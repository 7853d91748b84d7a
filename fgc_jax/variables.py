"""Model variables from our checkpoints or a reference `.pth`, checked against the config's model.

A checkpoint of another architecture is an `EvaluationError` naming both architectures
(`fgc_jax.models.description`), before anything is compiled.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from flax import traverse_util
import ml_collections
import numpy as np

from fgc_jax import checkpointing, storage, torch_import
from fgc_jax.evaluation import EvaluationError
from fgc_jax.models.description import describe_flax_params, describe_torch_state_dict, model_name


def check_variables(variables: Mapping[str, Any], template: Mapping[str, Any], source: str,
                    expected: str) -> None:
    """Raises EvaluationError naming both architectures if the trees or shapes differ."""
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(dict(variables)).items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(template)).items()}
    if got == want:
        return
    missing = sorted("/".join(map(str, k)) for k in want.keys() - got.keys())
    extra = sorted("/".join(map(str, k)) for k in got.keys() - want.keys())
    shapes = sorted(f"{'/'.join(map(str, k))}: {got[k]} vs {want[k]}"
                    for k in want.keys() & got.keys() if got[k] != want[k])
    detail = "; ".join(f"{title} {items[:3]}{' ...' if len(items) > 3 else ''}"
                       for title, items in (("missing", missing), ("unexpected", extra),
                                            ("shape (checkpoint vs model)", shapes)) if items)
    raise EvaluationError(
        f"{source} seems to hold a {describe_flax_params(variables.get('params', {}))}, but the "
        f"config builds a {expected}; pass the config it was trained with. ({detail})")


def torch_variables(config: ml_collections.ConfigDict, template: Mapping[str, Any],
                    state_dict: Mapping[str, np.ndarray], source: str) -> dict[str, Any]:
    """A PyTorch state_dict (read from `source`) as variables of the config's model.

    Raises EvaluationError naming both architectures if it holds another model.
    """
    try:
        return torch_import.torch_state_dict_to_flax(state_dict, template)
    except ValueError as e:
        try:
            seems = describe_torch_state_dict(state_dict)
        except Exception:  # pylint: disable=broad-except
            seems = "model that could not be identified"
        lines = str(e).splitlines()
        detail = "\n".join(lines[:6] + ([f"  ... and {len(lines) - 6} more"] if len(lines) > 6 else []))
        raise EvaluationError(
            f"{source} seems to hold a {seems}, but the config builds a {model_name(config)}; "
            f"pass the matching --config (e.g. --config.model.depth=...).\n{detail}") from e


def load_variables(config: ml_collections.ConfigDict, template: Mapping[str, Any], *,
                   workdir: str = "", step: int | None = None, torch_checkpoint: str = ""
                   ) -> tuple[dict[str, Any], str]:
    """Variables from our checkpoint (`workdir`, `step`) or a PyTorch `.pth`; returns (variables, source).

    A `.pth` that names code is refused unless `config.trust_pickled_code`
    (`torch_import.read_torch_checkpoint`).
    """
    if torch_checkpoint:
        if not os.path.isfile(torch_checkpoint):
            raise EvaluationError(f"--torch_checkpoint={torch_checkpoint} is not a file")
        state_dict, _ = torch_import.read_torch_checkpoint(
            torch_checkpoint, trust_pickled_code=config.trust_pickled_code)
        return (torch_variables(config, template, state_dict, torch_checkpoint),
                os.path.abspath(torch_checkpoint))

    variables, restored_step = checkpointing.restore_model_variables(workdir, step)
    source = f"{storage.display(storage.path(workdir) / 'checkpoints')} step {restored_step}"
    check_variables(variables, template, source, model_name(config))
    return variables, source
