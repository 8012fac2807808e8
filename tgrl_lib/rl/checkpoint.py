"""Training checkpoints that survive a kill at any moment, and `resume: auto`.

Layout of `output_dir`::

    step-000020/   model.safetensors, config.json, processor files   (a loadable HF directory)
                   optimizer.pt, scheduler.pt, rng.pt (every rank's)  (torch.save; loaded weights_only=True)
                   trainer_state.json                                (step, data cursor, config)
                   COMPLETE                                          (written last)
    final/         the last model (weights + processor), loadable by `models.policy.load_policy`
    metrics.jsonl

A checkpoint is written into `step-N.tmp/`, `COMPLETE` is written last, and only then is the directory
renamed to `step-N/`: a directory named `step-N` without `COMPLETE`, or any `*.tmp`, is never read (and is
removed on the next save). Only the `keep` newest complete checkpoints stay.

Bit-identical resume needs every random draw to replay: the trainer derives its sampling seeds from
(seed, step), the data order from (seed, epoch) plus the cursor saved here, and the global RNGs (python,
numpy, torch, CUDA) are saved and restored for anything else that draws from them. A run on several ranks
writes each checkpoint once (rank 0), with every rank's RNG state in `rng.pt` as
`{"world_size": N, "ranks": [state_0, ...]}`; each rank restores its own (`tgrl_lib.rl.distributed`).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgrl_lib.errors import TgrlError

COMPLETE = "COMPLETE"
STATE = "trainer_state.json"
FINAL = "final"
_STEP_DIR = re.compile(r"^step-(\d+)$")
MODEL_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt", STATE, COMPLETE)  # not part of the HF model dir


@dataclass
class TrainingState:
    """A complete checkpoint's bookkeeping (`trainer_state.json`); `tensors()` loads the rest."""

    path: Path
    step: int
    cursor: dict[str, int]
    config: dict[str, Any]

    def tensors(self) -> dict[str, Any]:
        """{"optimizer", "scheduler", "rng"} state dicts, loaded with `torch.load(weights_only=True)`."""
        import pickle

        import torch

        tensors = {}
        for name in ("optimizer", "scheduler", "rng"):
            path = self.path / f"{name}.pt"
            try:
                tensors[name] = torch.load(path, weights_only=True, map_location="cpu")
            except pickle.UnpicklingError:
                raise TgrlError(
                    "refusing training state that is not plain tensors and values (loaded with "
                    "torch.load(weights_only=True), which never runs code from a checkpoint)",
                    path=path,
                ) from None
            except (OSError, RuntimeError, EOFError) as err:
                reason = str(err) or type(err).__name__
                raise TgrlError(f"cannot read the checkpoint's training state: {reason}", path=path) from err
        return tensors


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"step-{step:06d}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / COMPLETE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


# ----------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors / plain lists (loadable with weights_only)."""
    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": [version, list(internal), gauss],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_meta": [int(np_state["state"]["pos"]), int(np_state["has_gauss"]), float(np_state["gauss"])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss, gauss_np = state["numpy_meta"]
    key = state["numpy_key"].numpy().astype(np.uint32)
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": key, "pos": pos},
            "has_gauss": has_gauss,
            "gauss": gauss_np,
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------- save / load
def save_checkpoint(
    output_dir: Path,
    step: int,
    *,
    model: Any,
    processor: Any,
    optimizer: Any,
    scheduler: Any,
    cursor: dict[str, int],
    config: dict[str, Any],
    keep: int,
    rng: dict[str, Any] | None = None,
    whole: tuple[dict | None, dict | None] = (None, None),
) -> Path:
    """Write `step-N/` atomically (tmp dir, COMPLETE last, rename) and prune to the `keep` newest.

    `rng` is what `rng.pt` holds: this process's `rng_state()` by default; a multi-rank run passes every
    rank's (`distributed.gather_rng_states`). `whole` = (model, optimizer) state dicts gathered from FSDP
    shards (`distributed.whole_state`), written instead of the model's and optimizer's own."""
    import torch

    from tgrl_lib.models.policy import save_policy

    final = step_dir(output_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model_state, optimizer_state = whole
    if model_state is None:
        save_policy(model, processor, tmp)
    else:
        model.save_pretrained(tmp, state_dict=model_state, safe_serialization=True)
        processor.save_pretrained(tmp)
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng if rng is not None else rng_state(), tmp / "rng.pt")
    state = {"step": step, "cursor": cursor, "config": config}
    (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _fsync_dir_files(tmp)
    (tmp / COMPLETE).write_text(f"step {step}\n", encoding="utf-8")
    if final.exists():  # an incomplete leftover from a kill, or a rerun of the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(output_dir, keep)
    return final


def prune(output_dir: Path, keep: int) -> None:
    """Remove all but the `keep` newest complete checkpoints, and any partial ones."""
    for path in output_dir.iterdir():
        partial = path.name.endswith(".tmp") and path.name.startswith(("step-", FINAL))
        incomplete = _STEP_DIR.match(path.name) and not (path / COMPLETE).is_file()
        if path.is_dir() and (partial or incomplete):
            shutil.rmtree(path)
    for _, path in complete_checkpoints(output_dir)[:-keep]:
        (path / COMPLETE).unlink()  # first: a kill inside rmtree leaves an incomplete (unread) directory
        shutil.rmtree(path)


def load_training_state(path: Path) -> TrainingState:
    """The bookkeeping of a complete checkpoint (step, data cursor, config)."""
    if not (path / COMPLETE).is_file():
        raise TgrlError("checkpoint is incomplete (no COMPLETE marker)", path=path)
    try:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        return TrainingState(path, int(state["step"]), dict(state["cursor"]), dict(state["config"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise TgrlError(f"cannot read {STATE}: {err}", path=path) from err


def publish_final(checkpoint: Path, output_dir: Path) -> Path:
    """`output_dir/final/`: the checkpoint's HF model files (hard links where possible), via a tmp dir."""
    final = output_dir / FINAL
    tmp = output_dir / (FINAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src in sorted(checkpoint.iterdir()):
        if src.is_file() and src.name not in MODEL_FILES:
            try:
                os.link(src, tmp / src.name)
            except OSError:
                shutil.copy2(src, tmp / src.name)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
