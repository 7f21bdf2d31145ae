"""Each task's two checkpoints, trained by our own code on CPU and cached: the teacher and the
student's warm start (the shared SFT checkpoint both methods continue from), HF-format Llamas
with the task's tokenizer.

addition
    teacher   hidden 64, 2 layers, ~109k parameters, SFT on correct completions (>= 95% exact match)
    student   hidden 32, 2 layers, ~25k parameters (< 1/4 of the teacher), a short SFT that
              stops once a dev set (not the held-out set) reaches 25% exact match: it has
              learnt the format and the digit sums but still drops carries, so it starts well
              below the teacher with its errors compounding over the 25 completion tokens
walks
    teacher   hidden 32, 1 layer, ~21k parameters, 1,500 SFT steps on uniform random walks
    student   hidden 8, 1 layer, ~1.7k parameters (its logits have rank <= 8), a short SFT on
              reference walks that stops once a dev set reaches 15% valid walks

Each is built once per cache directory (a progress bar shows the training), from its seed and
recipe, and written atomically with `opd_build.json` (recipe, held-out accuracy, build time).
The builds of the current recipes are also committed under `prebuilt/` (~0.5 MB in all), so a
fresh clone's `make demo` does not spend its 10 minutes re-training them on a busy 2-core
machine; `opd demo --rebuild-checkpoints` (or `rebuild=True`) trains them here instead. The directory name carries a recipe version: changing a recipe
builds anew instead of reusing a stale checkpoint. This module serves nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from opd_services.modeling.checkpoints import LlamaShape, llama_config, save_atomically
from opd_services.tasks import get_task
from opd_services.tasks.addition import TOKENIZER as CHARS, VOCAB_SIZE
from opd_services.tasks.train import SFTRecipe, eval_operands, held_out_metric, sft_train
from opd_services.tasks.walks import TOKENIZER as NODES


@dataclass(frozen=True)
class ModelSpec:
    shape: LlamaShape
    recipe: SFTRecipe
    version: int                 # bump when the recipe changes: it is built anew


SPECS = {
    ("addition", "teacher"): ModelSpec(LlamaShape(VOCAB_SIZE, 64, 2, 2, 2, 176, 64),
                                       SFTRecipe(steps=2000, batch=64, lr=3e-3, seed=0), 2),
    ("addition", "student"): ModelSpec(LlamaShape(VOCAB_SIZE, 32, 2, 1, 1, 64, 64),
                                       SFTRecipe(steps=4000, batch=64, lr=3e-3, seed=1, stop_at=0.25, decay=False), 3),
    ("walks", "teacher"): ModelSpec(LlamaShape(VOCAB_SIZE, 32, 1, 2, 2, 128, 80),
                                    SFTRecipe(steps=1500, batch=64, lr=3e-3, seed=0), 1),
    ("walks", "student"): ModelSpec(LlamaShape(VOCAB_SIZE, 8, 1, 1, 1, 16, 80),
                                    SFTRecipe(steps=3000, batch=64, lr=3e-3, seed=1, stop_at=0.15, decay=False), 1),
}
TOKENIZERS = {"addition": CHARS, "walks": NODES}
TEACHER_SHAPE = SPECS["addition", "teacher"].shape
STUDENT_SHAPE = SPECS["addition", "student"].shape
BUILD_FILE = "opd_build.json"


def n_params(shape: LlamaShape) -> int:
    h, f, v, n = shape.hidden_size, shape.intermediate_size, shape.vocab_size, shape.num_hidden_layers
    head = h // shape.num_attention_heads
    attn = h * h * 2 + 2 * h * head * shape.num_key_value_heads
    return n * (attn + 3 * h * f + 2 * h) + 2 * v * h + h


def build_trained(path: Path, shape: LlamaShape, recipe: SFTRecipe, desc: str, version: int = 0,
                  task_name: str = "addition") -> Path:
    """Train a fresh model on the task per `recipe`, unless `path` holds it already."""
    if (path / "config.json").exists():
        return path
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    task = get_task(task_name)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(llama_config(shape))
    t0 = time.perf_counter()
    with tqdm(total=recipe.steps, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True) as bar:
        losses = sft_train(model, task, recipe, progress=bar)
    acc = held_out_metric(model, task, eval_operands(task))
    info = {"task": {"name": task.name, **asdict(task)}, "shape": asdict(shape), "recipe": asdict(recipe),
            "recipe_version": version, "params": sum(p.numel() for p in model.parameters()),
            "final_loss": losses[-1], "eval_metric": acc, "build_seconds": round(time.perf_counter() - t0, 1)}
    print(f"{desc}: held-out {task.metric_name} {acc:.1%} ({info['build_seconds']}s)", file=sys.stderr, flush=True)

    def extra(tmp: Path) -> None:
        TOKENIZERS[task.name].save(tmp)
        (tmp / BUILD_FILE).write_text(json.dumps(info, indent=1))
    return save_atomically(model.eval(), path, extra)


PREBUILT = Path(__file__).resolve().parent / "prebuilt"


def _from_prebuilt(path: Path) -> bool:
    """Copy the committed build of this exact recipe into the cache, if the repo has one."""
    src = PREBUILT / path.name
    if not (src / "config.json").exists() or (path / "config.json").exists():
        return (path / "config.json").exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        for f in src.iterdir():
            shutil.copy2(f, tmp / f.name)
        os.rename(tmp, path)
    except OSError:
        if not (path / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def _get(cache_dir, task: str, role: str, desc: str, rebuild: bool) -> Path:
    get_task(task)
    spec = SPECS[task, role]
    path = _dir(cache_dir, task, role, spec)
    if rebuild:   # trained here, beside (never over) a copy of the committed build
        path = path.with_name(path.name + "-rebuilt")
    else:
        _from_prebuilt(path)
    return build_trained(path, spec.shape, spec.recipe, desc, spec.version, task)


def _dir(cache_dir: str | Path, task: str, role: str, spec: ModelSpec) -> Path:
    return Path(cache_dir) / "models" / f"{task}-{role}-{spec.shape.tag}-r{spec.version}-s{spec.recipe.seed}"


def task_teacher(cache_dir: str | Path, *, task: str = "addition", rebuild: bool = False) -> Path:
    """The task's teacher: the committed build (prebuilt/) copied into the cache, or trained here
    (`rebuild=True`, or no committed build of this recipe: 2-5 min on 2 busy CPU cores)."""
    return _get(cache_dir, task, "teacher", f"building the {task} teacher (once; cached)", rebuild)


def task_student(cache_dir: str | Path, *, task: str = "addition", rebuild: bool = False) -> Path:
    """The task's student warm start (short SFT, well below the teacher); committed or trained here."""
    return _get(cache_dir, task, "student", f"building the {task} student's warm start (once; cached)", rebuild)


def build_info(model_dir: str | Path) -> dict:
    path = Path(model_dir) / BUILD_FILE
    return json.loads(path.read_text()) if path.exists() else {}
