"""The Bios Cookbook: post-training recipes on the public `bios` SDK.

Each recipe has a sync version (one request at a time: the loop is the algorithm, for reading)
and an async version (requests overlapped: for production), with the same data, loss and
hyper-parameters:

- `sl`: supervised fine-tuning on chat data, prompt masked by the chat renderer.
- `rl`: RL with a verifiable reward (arithmetic), group-normalised advantages.
- `dpo`: preference learning against a frozen reference, via `forward_backward_custom`.
- `distill`: on-policy distillation from a teacher, per-token reverse KL as the advantage.
- `eval`: sample a held-out set and score it with code.

Run one with `bios cookbook run RECIPE [--style sync|async]` (see `bios.cookbook.runner`) or
call `bios.cookbook.run_recipe`. Modules import without torch; `dpo` needs torch at run time
(for its custom loss).
"""

from __future__ import annotations

from bios.cookbook.recipe import RecipeConfig, RecipeResult
from bios.cookbook.runner import RECIPES, run_recipe

__all__ = ["RECIPES", "RecipeConfig", "RecipeResult", "run_recipe"]
