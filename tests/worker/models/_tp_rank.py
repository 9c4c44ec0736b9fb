"""One rank of the tensor-parallel tests (tests/worker/models/test_tensor_parallel.py),
run in its own process by ``torch.multiprocessing.spawn``. ``run``: every rank builds the
same engine over its shard of the model and runs the same requests, so the collectives
of each step meet (the sharding's test). ``run_leader``: rank 0 alone schedules and
samples, the other ranks follow its steps (worker.parallel.steps)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from worker import Engine, EngineConfig, SamplingParams
from worker.engine import engine as engine_module
from worker.parallel.group import init_group
from worker.parallel.shard import VocabParallelEmbedding, VocabParallelLMHead, shard_decoder
from worker.parallel.steps import StepSender, follow


def sharded_engine(path: str, tp, **config) -> Engine:
    """An engine whose loaded model is sharded before anything else sees it."""
    load = engine_module.load_model

    def load_sharded(cfg, device, shard=None, reading=None):
        return load(cfg, device, lambda model: shard_decoder(model, tp), reading)

    engine_module.load_model = load_sharded
    try:
        return Engine(EngineConfig(model=path, **config))
    finally:
        engine_module.load_model = load


@torch.no_grad()
def vocab_layers(tp) -> dict:
    """An odd vocabulary (7 rows at 2 ranks: the last part padded) through both layers."""
    torch.manual_seed(3)
    emb, head = torch.nn.Embedding(7, 4), torch.nn.Linear(4, 7, bias=True)
    ids = torch.tensor([[0, 3, 4, 6, 2]])
    x = torch.randn(5, 4)
    got_e = VocabParallelEmbedding(emb, tp)(ids)
    got_h = VocabParallelLMHead(head, tp)(x)
    return {"embed": float((got_e - emb(ids)).abs().max()),
            "head": float((got_h - head(x)).abs().max()), "head_cols": got_h.shape[-1]}


def run(rank: int, size: int, port: int, jobs: list[dict], out_dir: str) -> None:
    torch.set_num_threads(1)
    tp = init_group(rank, size, "127.0.0.1", port)
    results = {"vocab": vocab_layers(tp)}
    for job in jobs:
        engine = sharded_engine(job["path"], tp, **job["config"])
        params = [SamplingParams(**p) for p in job["params"]]
        outs = engine.generate(job["prompts"], params)
        engine.check_kv_invariants()
        results[job["name"]] = {
            "tokens": [o.token_ids for o in outs],
            "kv_heads": engine.generation.runner.cache.spec.num_kv_heads,
            "held": sum(p.numel() for p in engine.runner.model.parameters()),
            "embed": engine.embed(job["packed"]).tolist(),
            "score": [s.tolist() for s in engine.score(job["packed"])],
            "steps": engine.stats.num_steps,
        }
        engine.shutdown()
    torch.distributed.barrier()
    if rank == 0:
        Path(out_dir, "tp.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def run_leader(rank: int, size: int, port: int, jobs: list[dict], out_dir: str) -> None:
    """Rank 0 schedules and samples, sending each step (worker.parallel.steps); the other
    ranks only follow. Each rank writes its own results."""
    torch.set_num_threads(1)
    tp = init_group(rank, size, "127.0.0.1", port)
    results = {}
    for job in jobs:
        engine = sharded_engine(job["path"], tp, **job["config"])
        runner = engine.generation.runner
        if rank == 0:
            sender = StepSender(tp)
            runner.step_sender = sender
            rounds = []
            for _ in range(job["rounds"]):  # the later rounds find the prompts cached
                outs = engine.generate(job["prompts"], [SamplingParams(**p)
                                                        for p in job["params"]])
                rounds.append({"tokens": [o.token_ids for o in outs],
                               "preemptions": sum(o.num_preemptions for o in outs)})
            sender.stop()
            engine.check_kv_invariants()
            results[job["name"]] = {"rounds": rounds, "sent": sender.num_sent,
                                    "prefix_hits": engine.stats.prefix_cache_hits,
                                    "kv_heads": runner.cache.spec.num_kv_heads}
        else:
            results[job["name"]] = {"followed": follow(runner, tp),
                                    "kv_heads": runner.cache.spec.num_kv_heads}
        engine.shutdown()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    torch.distributed.destroy_process_group()


def run_agree(rank: int, size: int, port: int, path: str, out_dir: str) -> None:
    """Each rank with its own limits (as if each device had other free memory): every
    rank's engine plans the smallest budget and KV block count of the ranks."""
    torch.set_num_threads(1)
    tp = init_group(rank, size, "127.0.0.1", port)
    config = EngineConfig(model=path, max_num_batched_tokens=(64, 48)[rank],
                          num_kv_blocks=(64, 40)[rank], max_num_running_seqs=8)
    engine = Engine(config, tp=tp)
    plan = engine.memory
    Path(out_dir, f"agree{rank}.json").write_text(json.dumps({
        "budget": plan.token_budget, "kv_blocks": plan.kv.num_blocks,
        "allocated_blocks": engine.generation.blocks.num_blocks,
        "capacity": engine.capacity_tokens, "ranks": plan.num_ranks}))
    engine.shutdown()
    torch.distributed.destroy_process_group()


class LinearMemory:
    """A fake allocator: the peak of a forward is ``baseline + per_token * its tokens``."""

    def __init__(self, baseline: int, per_token: int):
        self.baseline, self.per_token, self.last = baseline, per_token, 0

    def allocated_bytes(self) -> int:
        return self.baseline

    def reset_peak(self) -> None:
        self.last = 0

    def peak_allocated_bytes(self) -> int:
        return self.baseline + self.per_token * self.last

    def release_cached(self) -> None:
        pass


PROBE_RANKS = [dict(used_gib=1, per_token_mib=2, baseline_mib=300),  # rank 0: more room
               dict(used_gib=2, per_token_mib=3, baseline_mib=100)]  # rank 1: less


def run_probe(rank: int, size: int, port: int, path: str, out_dir: str) -> None:
    """The TP probe with a fake device per rank (NVML reading and allocator): rank 0
    drives it, rank 1 follows its forwards and answers its readings."""
    from worker.budget.nvml import FakeNvmlReader
    from worker.engine.memory_plan import probe_over_ranks

    torch.set_num_threads(1)
    tp = init_group(rank, size, "127.0.0.1", port)
    engine = Engine(EngineConfig(model=path, max_num_batched_tokens=2048,
                                 max_num_running_seqs=8), tp=tp)
    fake = PROBE_RANKS[rank]
    nvml = FakeNvmlReader(8 << 30, fake["used_gib"] << 30)
    memory = LinearMemory(fake["baseline_mib"] << 20, fake["per_token_mib"] << 20)
    engine.runner.fault_hook = lambda n, s: setattr(memory, "last", n)  # before each forward
    sender = StepSender(tp) if rank == 0 else None
    engine.runner.step_sender = sender
    budget, report = probe_over_ranks(engine.config, engine.runner, engine.device, tp, sender,
                                      max_model_len=engine.config.max_model_len, nvml=nvml,
                                      memory=memory)
    agreed = tp.min_int(budget)
    result = {"budget": agreed}
    if report is not None:
        result["warmup"] = [p.num_tokens for p in report.warmup]
        result["used_bytes"] = report.used_bytes
    Path(out_dir, f"probe{rank}.json").write_text(json.dumps(result))
    engine.shutdown()
    torch.distributed.destroy_process_group()
