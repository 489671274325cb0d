"""``python -m bi_jax``: the needle experiment, a serving-style test of batch invariance.

One "needle" prompt is decoded alone, then inside batches of other requests of different lengths, as
a continuous-batching server would run it: the needle sits at a random place in the request queue
(so in a random batch slot, arriving at step 0 or when a slot frees), prompts are prefilled whole or
in chunks, finished requests leave and queued ones take their slot, so one batch mixes prefill chunks
and decode tokens (``bi_jax.decode_attention`` with per-row ``q_lengths``). The same weights run
twice: through bi_jax (the default implementation: Pallas on a GPU, the jnp reference elsewhere) and
through XLA's default ops (``implementation="xla"``). For each backend it reports how many distinct
completions the needle got, the first token at which any completion diverged from the needle-alone
run, and how many decode steps produced logits that are not bitwise identical to the needle-alone
run's. Nothing is claimed that was not measured: if XLA happens not to vary, the output says so.

Needs the ``flax`` extra. Random fixed-seed weights by default (``--size small`` on the CPU, ``1b`` on
a GPU); ``--weights DIR`` loads a local Hugging Face Llama checkpoint instead (token ids only: the
prompts are random ids, no tokenizer is used).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any

import jax
import numpy as np

from bi_jax import _backend as be


@dataclasses.dataclass(frozen=True)
class Plan:
    """One run: batch size, prefill mode and the request queue around the needle."""

    batch: int
    mode: str  # "whole" | "chunked"
    chunk: int | None
    needle_index: int  # position of the needle in the queue
    others: tuple[tuple[tuple[int, ...], int], ...]  # (prompt, max_new_tokens) of the other requests

    @property
    def label(self) -> str:
        mode = "whole" if self.chunk is None else f"chunk {self.chunk}"
        return f"B={self.batch:<3d} {mode:<8s}"


@dataclasses.dataclass
class Outcome:
    plan: Plan
    tokens: list[int]
    logits: np.ndarray  # [steps, vocab]
    slot: int  # batch slot the needle ran in
    steps_run: int


@dataclasses.dataclass(frozen=True)
class Size:
    config: str  # LlamaConfig preset
    batch_sizes: tuple[int, ...]
    steps: int
    prompt_lengths: tuple[int, int]  # of the other requests, inclusive
    needle_length: int
    chunks: tuple[int, ...]  # prefill chunk sizes, taken in turn by the batch sizes
    buckets: tuple[int, ...] | None  # padded token counts per step (few shapes: few compilations)


SIZES = {
    "tiny": Size("tiny", (1, 2, 3), 4, (2, 12), 8, (3, 5), (1, 16)),
    "small": Size("small", (1, 3, 8), 16, (4, 32), 24, (4, 7, 16), (1, 32)),
    "1b": Size("llama_1b", (1, 3, 8, 17, 64), 32, (8, 256), 100, (16, 32, 64), (1, 64, 256)),
}


def make_plans(batch_sizes: list[int], *, vocab: int, prompt_lengths: tuple[int, int],
               steps: int, chunks: tuple[int, ...], rng: np.random.Generator) -> list[Plan]:
    """The needle-alone reference first, then for each batch size a whole and a chunked run."""
    plans = [Plan(1, "whole", None, 0, ())]
    lo, hi = prompt_lengths
    for i, b in enumerate(batch_sizes):
        for mode in ("whole", "chunked"):
            if b == 1 and mode == "whole":
                continue  # that is the reference
            n_other = 0 if b == 1 else b - 1 + max(1, b // 2)  # more requests than slots
            others = tuple(
                (tuple(int(t) for t in rng.integers(0, vocab, int(rng.integers(lo, hi + 1)))),
                 int(rng.integers(1, 2 * steps + 1)))
                for _ in range(n_other)
            )
            chunk = chunks[i % len(chunks)] if mode == "chunked" else None  # vary the chunking
            needle_index = int(rng.integers(0, n_other + 1))
            plans.append(Plan(b, mode, chunk, needle_index, others))
    return plans


def run_plan(runner: Any, plan: Plan, needle: list[int], steps: int, *, seed: int,
             temperature: float = 0.0, buckets: tuple[int, ...] | None = None,
             on_step: Any = None) -> Outcome:
    from bi_jax.llama import Request, serve

    needle_req = Request(list(needle), steps, seed=seed, temperature=temperature,
                         record_logits=True)
    reqs = [Request(list(p), n, seed=seed + 1 + i, temperature=temperature)
            for i, (p, n) in enumerate(plan.others)]
    reqs.insert(plan.needle_index, needle_req)
    max_length = max(len(r.prompt) + r.max_new_tokens for r in reqs)
    count = [0]

    def step_hook() -> None:
        count[0] += 1
        if on_step is not None:
            on_step()

    serve(runner, reqs, slots=plan.batch, max_length=max_length, prefill_chunk=plan.chunk,
          until=lambda: needle_req.done, on_step=step_hook, buckets=buckets)
    # The needle's slot: requests fill slots in queue order; recover it for the report.
    slot = _needle_slot(plan, reqs, needle_req)
    return Outcome(plan, needle_req.tokens, np.stack(needle_req.logits), slot, count[0])


def _needle_slot(plan: Plan, reqs: list[Any], needle: Any) -> int:
    idx = reqs.index(needle)
    return idx if idx < plan.batch else -1  # -1: it arrived later, in whichever slot freed first


@dataclasses.dataclass
class Summary:
    backend: str
    runs: int
    distinct: int
    first_divergence: int | None  # 0-based token index, None: no divergence
    diff_steps: int
    total_steps: int
    runs_with_diff: int
    seconds: float


def summarize(backend: str, outcomes: list[Outcome], seconds: float) -> Summary:
    ref = outcomes[0]
    distinct = len({tuple(o.tokens) for o in outcomes})
    first = None
    diff_steps = total = runs_with_diff = 0
    for o in outcomes[1:]:
        for i, (a, b) in enumerate(zip(o.tokens, ref.tokens)):
            if a != b:
                first = i if first is None else min(first, i)
                break
        same = [np.array_equal(x.view(np.uint32), y.view(np.uint32))
                for x, y in zip(o.logits, ref.logits)]
        diff_steps += same.count(False)
        total += len(same)
        runs_with_diff += not all(same)
    return Summary(backend, len(outcomes), distinct, first, diff_steps, total, runs_with_diff,
                   seconds)


def _per_run_lines(outcomes: list[Outcome]) -> list[str]:
    ref = outcomes[0]
    lines = []
    for o in outcomes:
        same = [np.array_equal(x.view(np.uint32), y.view(np.uint32))
                for x, y in zip(o.logits, ref.logits)]
        div = next((i for i, (a, b) in enumerate(zip(o.tokens, ref.tokens)) if a != b), None)
        where = f"slot {o.plan.needle_index}" if o.slot >= 0 else "queued"
        lines.append(
            f"    {o.plan.label} needle {where:<8s} {o.steps_run:4d} steps  "
            + ("reference (needle alone)" if o is ref else
               f"completion {'same' if div is None else f'diverges at token {div + 1}':<22s} "
               f"logits differ in {same.count(False):3d}/{len(same)} decode steps")
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bi_jax", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default=None,
                   help="model size with random weights (default: small on CPU, 1b on GPU)")
    p.add_argument("--weights", metavar="DIR", help="local Hugging Face Llama checkpoint directory")
    p.add_argument("--steps", type=int, default=None, help="tokens to decode for the needle")
    p.add_argument("--batch-sizes", default=None,
                   help="comma-separated batch sizes (default: 1,3,8 on CPU; 1,3,8,17,64 on GPU)")
    p.add_argument("--backend-only", choices=("bi_jax", "xla"), default=None,
                   help="run one backend only")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and placement")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 = seeded sampling (a key per request and token)")
    p.add_argument("--dtype", default=None,
                   help="model dtype (default: bfloat16 for random weights, the checkpoint's with "
                        "--weights)")
    p.add_argument("--quiet", action="store_true", help="no per-run lines, no progress bar")
    args = p.parse_args(argv)

    try:
        from flax import nnx  # noqa: F401
    except ImportError:  # pragma: no cover
        print("python -m bi_jax needs flax: pip install 'bi_jax[flax]'", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    from bi_jax import llama
    from bi_jax import nn as bnn

    gpu = be.has_gpu()
    size = args.size or ("1b" if gpu else "small")
    spec = SIZES[size]
    steps = args.steps or spec.steps
    batch_sizes = ([int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes
                   else list(spec.batch_sizes))
    if steps < 1 or any(b < 1 for b in batch_sizes):
        p.error("--steps and --batch-sizes must be positive")
    dtype = args.dtype

    t0 = time.perf_counter()
    if args.weights:
        model = llama.load_hf_checkpoint(args.weights, dtype=dtype)
        source = f"weights from {args.weights}"
    else:
        cfg = getattr(llama.LlamaConfig, spec.config)(dtype=dtype or "bfloat16")
        model = llama.Llama(cfg, seed=args.seed)
        source = f"random weights (seed {args.seed})"
    cfg = model.config
    rng = np.random.default_rng(args.seed)
    needle = [int(t) for t in rng.integers(0, cfg.vocab_size, spec.needle_length)]
    plans = make_plans(batch_sizes, vocab=cfg.vocab_size, prompt_lengths=spec.prompt_lengths,
                       steps=steps, chunks=spec.chunks, rng=rng)

    default_impl = be.resolve_implementation(None, "demo")
    backends = [("bi_jax", None, f"bi_jax ({default_impl})"), ("xla", "xla", "XLA default")]
    if args.backend_only:
        backends = [b for b in backends if b[0] == args.backend_only]

    sampling = "greedy" if args.temperature == 0 else f"seeded sampling, T={args.temperature}"
    print(f"bi_jax needle experiment on {jax.default_backend().upper()} "
          f"({jax.devices()[0].device_kind})")
    print(f"  model: Llama-style, {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads "
          f"{cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size}, "
          f"{cfg.num_params() / 1e6:.1f}M params, {cfg.dtype}, {source}")
    print(f"  needle: {len(needle)}-token prompt, {steps} decode steps, {sampling}; batch sizes "
          f"{', '.join(map(str, batch_sizes))}; prefill whole and chunked; "
          f"{len(plans)} runs per backend")

    summaries, per_run = [], {}
    bar = tqdm(total=len(plans) * len(backends), unit="run", disable=args.quiet or None,
               file=sys.stderr, dynamic_ncols=True)
    for name, impl, label in backends:
        bnn.set_implementation(model, impl)
        runner = llama.Runner(model)
        t = time.perf_counter()
        outcomes = []
        for plan in plans:
            bar.set_postfix_str(f"{name} {plan.label.strip()}")
            outcomes.append(run_plan(runner, plan, needle, steps, seed=args.seed + 1000,
                                     temperature=args.temperature, buckets=spec.buckets))
            bar.update()
        summaries.append(summarize(label, outcomes, time.perf_counter() - t))
        per_run[label] = _per_run_lines(outcomes)
    bar.close()
    bnn.set_implementation(model, None)

    if not args.quiet:
        for label, lines in per_run.items():
            print(f"  {label}: needle per run (compared with the needle alone)")
            print("\n".join(lines))
    print()
    print(f"  {'backend':<22s} {'runs':>4s} {'distinct completions':>21s} "
          f"{'first divergent token':>22s} {'decode steps w/ different logits':>33s}")
    for s in summaries:
        first = "none" if s.first_divergence is None else f"token {s.first_divergence + 1}"
        print(f"  {s.backend:<22s} {s.runs:>4d} {s.distinct:>21d} {first:>22s} "
              f"{f'{s.diff_steps} of {s.total_steps}':>33s}")
    print()
    status = 0
    for s in summaries:
        if s.diff_steps == 0 and s.distinct == 1:
            verdict = (f"the needle's logits were bitwise identical in all {s.total_steps} decode "
                       f"steps of {s.runs - 1} batched runs: batch-invariant here")
            if s.backend == "XLA default":
                verdict += " (XLA happened not to vary in this setting)"
        else:
            verdict = (f"{s.distinct} distinct completion(s); the needle's logits differed from the "
                       f"needle-alone run in {s.diff_steps} of {s.total_steps} decode steps "
                       f"({s.runs_with_diff} of {s.runs - 1} batched runs)")
            if s.backend.startswith("bi_jax"):
                verdict += "  <-- UNEXPECTED: bi_jax should be invariant"
                status = 1
        print(f"  {s.backend}: {verdict} [{s.seconds:.0f}s]")
    print(f"  total {time.perf_counter() - t0:.0f}s")
    return status


if __name__ == "__main__":
    sys.exit(main())
