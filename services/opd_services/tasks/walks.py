"""The second synthetic task: long random walks on a fixed random graph (OPD's regime).

A fixed directed graph on 61 nodes, each with 4 out-neighbours (seeded). A problem is a start
node; the completion is a walk of 64 steps, each to an out-neighbour of the node before it:

    prompt      <bos> v_start
    completion  v_1 v_2 ... v_64            (no <eos>: the walk stops after 64 steps)

The reference completion is a uniform random walk (every neighbour equally likely), so the
teacher's distribution is high-entropy (4 valid successors, ~1.39 nats per step) and long. A
completion is graded *valid* when all 64 steps are edges of the graph: one step off the graph
fails the walk, so per-step errors compound (0.99 per step is 53% per walk). The metric is
sampled (temperature 1, the distribution the student is trained to match), not greedy.

Why this task: the student is far too small to store the graph's 244 edges (its
logits come from a hidden size of 8, i.e. a rank-8 bigram table over 64 tokens), so it cannot
match the teacher exactly. Forward KL (SFT on teacher samples) is mode-covering and must
spread mass over all four successors of every node, leaking some onto non-edges; reverse KL
(on-policy distillation) is mode-seeking and may drop successors it cannot represent and keep
the ones it can (MiniLLM; GKD: small student, sampled outputs, long sequences).

Node v is token 3 + v; ids 0..2 are <bos>, <eos>, <pad> as in the addition task. A problem is
stored as [start, walk_seed] (the seed fixes the reference walk). Train and held-out problems
come from disjoint seed streams. This module does no training and knows nothing of torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import numpy as np

from opd_services.tasks.addition import BOS, EOS, VOCAB_SIZE, CharTokenizer

FIRST_NODE = 3
TOKENIZER = CharTokenizer(("<bos>", "<eos>", "<pad>") + tuple(f"v{i} " for i in range(VOCAB_SIZE - FIRST_NODE)))


@dataclass(frozen=True)
class WalkTask:
    n_nodes: int = VOCAB_SIZE - FIRST_NODE     # 61
    degree: int = 4
    walk_len: int = 64
    graph_seed: int = 7
    name: ClassVar[str] = "walks"
    metric_name: ClassVar[str] = "valid walks"
    eval_temperature: ClassVar[float] = 1.0     # the metric samples, at the teacher's temperature
    stop_ids: ClassVar[tuple[int, ...]] = (EOS,)

    @property
    def prompt_len(self) -> int:
        return 2

    @property
    def completion_len(self) -> int:
        return self.walk_len

    @cached_property
    def neighbours_N_D(self) -> np.ndarray:
        """[n_nodes, degree] the out-neighbours of every node (no self-loops, no repeats)."""
        rng = np.random.default_rng(self.graph_seed)
        rows = [rng.choice(np.delete(np.arange(self.n_nodes), v), self.degree, replace=False)
                for v in range(self.n_nodes)]
        return np.sort(np.stack(rows), axis=1)

    @cached_property
    def adjacency_N_N(self) -> np.ndarray:
        adj = np.zeros((self.n_nodes, self.n_nodes), dtype=bool)
        adj[np.arange(self.n_nodes)[:, None], self.neighbours_N_D] = True
        return adj

    def sample_operands(self, rng: np.random.Generator, n: int, split: str = "train") -> np.ndarray:
        """[n, 2] problems: (start node, walk seed). Held-out seeds are odd, training seeds even."""
        start = rng.integers(0, self.n_nodes, size=n)
        seed = 2 * rng.integers(0, 2**40, size=n) + (1 if split == "eval" else 0)
        return np.stack([start, seed], axis=1)

    def prompts(self, operands_B_2: np.ndarray) -> np.ndarray:
        """[B, 2] token ids: <bos>, the start node."""
        return np.stack([np.full(len(operands_B_2), BOS), operands_B_2[:, 0] + FIRST_NODE], axis=1)

    def completions(self, operands_B_2: np.ndarray) -> np.ndarray:
        """[B, walk_len] reference completions: uniform random walks, fixed by each problem's seed."""
        b = len(operands_B_2)
        rng = np.random.default_rng([int(s) for s in operands_B_2[:, 1]] or [0])
        pick_B_T = rng.integers(0, self.degree, size=(b, self.walk_len))
        node = operands_B_2[:, 0].copy()
        cols = []
        for t in range(self.walk_len):
            node = self.neighbours_N_D[node, pick_B_T[:, t]]
            cols.append(node + FIRST_NODE)
        return np.stack(cols, axis=1)

    def step_valid(self, operands_B_2: np.ndarray, completions) -> list[np.ndarray]:
        """Per completion, bool [T]: is step t an edge (from the node before it)?"""
        out = []
        for start, comp in zip(operands_B_2[:, 0], completions):
            nodes = np.asarray(comp).reshape(-1) - FIRST_NODE
            ok = (nodes >= 0) & (nodes < self.n_nodes)
            prev = np.concatenate([[start], np.where(ok, nodes, 0)[:-1]])
            out.append(ok & self.adjacency_N_N[prev, np.where(ok, nodes, 0)])
        return out

    def grade(self, operands_B_2: np.ndarray, completions) -> np.ndarray:
        """Valid walk, bool [B]: exactly walk_len steps, every one an edge of the graph."""
        return np.array([len(v) == self.walk_len and bool(v.all())
                         for v in self.step_valid(operands_B_2, completions)], dtype=bool)

    def edge_coverage(self, operands_B_2: np.ndarray, completions) -> float:
        """Share of the graph's edges that the (valid steps of the) completions use: how much of
        the teacher's diversity a student keeps (a mode-seeking student may use few)."""
        used = np.zeros_like(self.adjacency_N_N)
        for start, comp, ok in zip(operands_B_2[:, 0], completions, self.step_valid(operands_B_2, completions)):
            nodes = np.concatenate([[start], np.asarray(comp).reshape(-1) - FIRST_NODE])
            used[nodes[:-1][ok], nodes[1:][ok]] = True
        return float(used.sum() / self.adjacency_N_N.sum())

    def text(self, ids) -> str:
        return TOKENIZER.decode(ids)


DEFAULT_WALKS = WalkTask()
