"""The demo's two checkpoints, trained by our own code on CPU and cached: the teacher and the
student's warm start, both HF-format Llamas with the addition task's character tokenizer.

    teacher   hidden 64, 2 layers, ~109k parameters, SFT on correct completions (>= 95% exact match)
    student   hidden 32, 2 layers, ~25k parameters (< 1/4 of the teacher), a short SFT only,
              so it starts well below the teacher and has something to learn from it

Each is built once per cache directory (a progress bar shows the training), deterministically
from its seed and recipe, and written atomically with `opd_build.json` (recipe, held-out
accuracy, build time). The directory name carries a recipe version: changing a recipe
builds anew instead of reusing a stale checkpoint. This module serves nothing.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from opd_services.tasks.addition import DEFAULT_TASK, TOKENIZER, VOCAB_SIZE
from opd_services.tasks.checkpoints import LlamaShape, llama_config, save_atomically
from opd_services.tasks.train import SFTRecipe, eval_operands, exact_match, sft_train

RECIPE_VERSION = 2
TEACHER_SHAPE = LlamaShape(VOCAB_SIZE, 64, 2, 2, 2, 176, 64)
STUDENT_SHAPE = LlamaShape(VOCAB_SIZE, 32, 2, 1, 1, 64, 64)
TEACHER_RECIPE = SFTRecipe(steps=2000, batch=64, lr=3e-3, seed=0)
STUDENT_RECIPE = SFTRecipe(steps=1200, batch=64, lr=3e-3, seed=1)
BUILD_FILE = "opd_build.json"


def n_params(shape: LlamaShape) -> int:
    h, f, v, n = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers
    head = h // shape.num_attention_heads
    attn = h * h * 2 + 2 * h * head * shape.num_key_value_heads
    return n * (attn + 3 * h * f + 2 * h) + 2 * v * h + h


def build_trained(path: Path, shape: LlamaShape, recipe: SFTRecipe, desc: str) -> Path:
    """Train a fresh model on the addition task per `recipe`, unless `path` holds it already."""
    if (path / "config.json").exists():
        return path
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(llama_config(shape))
    t0 = time.perf_counter()
    with tqdm(total=recipe.steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        losses = sft_train(model, DEFAULT_TASK, recipe, progress=bar)
    acc = exact_match(model, DEFAULT_TASK, eval_operands(DEFAULT_TASK))
    info = {"task": asdict(DEFAULT_TASK), "shape": asdict(shape), "recipe": asdict(recipe),
            "recipe_version": RECIPE_VERSION, "params": sum(p.numel() for p in model.parameters()),
            "final_loss": losses[-1], "eval_exact_match": acc, "build_seconds": round(time.perf_counter() - t0, 1)}
    print(f"{desc}: held-out exact match {acc:.1%} ({info['build_seconds']}s)", file=sys.stderr, flush=True)

    def extra(tmp: Path) -> None:
        TOKENIZER.save(tmp)
        (tmp / BUILD_FILE).write_text(json.dumps(info, indent=1))
    return save_atomically(model.eval(), path, extra)


def _dir(cache_dir: str | Path, role: str, shape: LlamaShape, recipe: SFTRecipe) -> Path:
    return Path(cache_dir) / "models" / f"addition-{role}-{shape.tag}-r{RECIPE_VERSION}-s{recipe.seed}"


def task_teacher(cache_dir: str | Path) -> Path:
    """The demo teacher (built on first use, ~1-3 min on 2 CPU cores)."""
    return build_trained(_dir(cache_dir, "teacher", TEACHER_SHAPE, TEACHER_RECIPE), TEACHER_SHAPE,
                         TEACHER_RECIPE, "building the demo teacher (once; cached)")


def task_student(cache_dir: str | Path) -> Path:
    """The student's warm start: a short SFT, well below the teacher."""
    return build_trained(_dir(cache_dir, "student", STUDENT_SHAPE, STUDENT_RECIPE), STUDENT_SHAPE,
                         STUDENT_RECIPE, "building the demo student's warm start (once; cached)")


def build_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / BUILD_FILE
    return json.loads(path.read_text()) if path.exists() else {}
