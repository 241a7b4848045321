"""What scores a completion, for rejection sampling (sample-best) and RL (PPO, GRPO): a user's Python
function named MODULE:FUNCTION, or a reward model (a checkpoint with a score head).

A function is called as FUNCTION(prompt, completion) -> float: `prompt` is the prompt line's
"prompt" string or "messages" list, `completion` the generated text. It may raise or return
something that is not a finite number: either is reported as one `error:` line naming the function
and the prompt's file and line.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

from llama_jax import sharding
from llama_jax.chat import ChatError, Message, encode_dialog_with_mask
from llama_jax.errors import UserError
from llama_jax.load import Loaded, load
from llama_jax.scoring import rewards

Reward = Callable[[Any, str], float]


def load_reward(spec: str) -> Reward:
    """The function named by MODULE:FUNCTION, MODULE importable or a path to a .py file."""
    module_name, sep, name = spec.rpartition(":")
    if not sep or not module_name or not name:
        raise UserError(f"--reward must be MODULE:FUNCTION or FILE.py:FUNCTION, got {spec!r}")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).is_file():
                raise UserError(f"--reward {spec}: no file {module_name}")
            file_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(file_spec)
            file_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # anything the user's module raises while importing
        raise UserError(f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e})") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"--reward {spec}: {module_name} has no function {name!r}")
    return function


def call_reward(reward: Reward, prompt: Any, completion: str, where: str) -> float:
    """reward(prompt, completion) as a float; raising, or anything but a finite number, is a
    UserError naming `where` (the function and the prompt's file and line)."""
    try:
        value = reward(prompt, completion)
    except Exception as e:
        raise UserError(f"{where}: the reward function raised {type(e).__name__}: {e}") from None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise UserError(f"{where}: the reward function returned {value!r}, not a number")
    if not math.isfinite(value):
        raise UserError(f"{where}: the reward function returned {value!r}, not a finite number")
    return float(value)


def load_reward_model(checkpoint: str, dtype: str = "auto", plan: str = "single") -> Loaded:
    """A reward model (any checkpoint format with a score head) and its tokenizer."""
    return load(checkpoint, dtype, need_tokenizer=True, plan=plan, head="score")


def score_dialogs(
    rm: Loaded, dialogs: Sequence[Sequence[Message]], where: Sequence[str], batch_size: int
) -> list[float]:
    """The reward model's score of finished dialogs (each ending with the assistant's answer), laid
    out in its own tokenizer's chat format as it was trained."""
    sequences = []
    for dialog, at in zip(dialogs, where, strict=True):
        try:
            sequences.append(encode_dialog_with_mask(rm.tokenizer, dialog)[0][: rm.cfg.max_seq_len])
        except ChatError as e:
            raise UserError(f"{at}: {e}") from None
    batch_size = -(-batch_size // rm.batch_multiple) * rm.batch_multiple
    with sharding.activate(rm.plan, rm.mesh):
        return rewards(rm.model, rm.params, sequences, batch_size) if sequences else []
