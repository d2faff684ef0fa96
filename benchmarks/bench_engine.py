"""portable_rl's CPU rollout engine over HTTP vs in-process Hugging Face ``generate``: generated tokens/s.

Same checkpoint, same batch of prompts, same number of new tokens per sequence (EOS ignored), sampling at
temperature 1, the same torch thread count in both. The engine runs as its own server process and the batch
arrives as concurrent ``/generate`` requests (what a rollout sends, from one client kept across runs as the
rollout manager keeps it); HF generates the batch in one call.
Prints one table with the median of ``--runs`` timed runs (HF and engine interleaved) after one warm-up, and the ratio engine / HF
(above 1 = the engine is faster), for the medians and for the fastest runs.

    python benchmarks/bench_engine.py                          # tiny model and a ~30M-parameter model
    python benchmarks/bench_engine.py --models tiny --runs 3   # seconds
    python benchmarks/bench_engine.py --model-path DIR         # any HF checkpoint with a tokenizer
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import torch

from portable_rl.models.tiny import TinySpec, build_tiny_checkpoint
from portable_rl.protocol.client import EngineClient
from portable_rl.rollout.engines.launcher import EngineSpec, launch_engine

MODELS = {
    "tiny": TinySpec(arch="llama"),
    "small": TinySpec(
        arch="llama",
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}


def prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def hf_generate(path: Path, batch: list[list[int]], new_tokens: int):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(batch)
    mask = torch.ones_like(ids)

    def run() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=0,
            )
        elapsed = time.perf_counter() - start
        assert out.shape[1] == ids.shape[1] + new_tokens
        return ids.shape[0] * new_tokens / elapsed

    return run


def engine_generate(url: str, batch: list[list[int]], new_tokens: int):
    """(run, close): ``run()`` sends the batch and returns tokens/s. One client and its connections serve every
    run, as a rollout manager keeps its engine client for the whole training run."""
    params = {"max_new_tokens": new_tokens, "temperature": 1.0, "ignore_eos": True}
    loop = asyncio.new_event_loop()
    client = EngineClient(url)

    async def one_run() -> float:
        start = time.perf_counter()
        outs = await asyncio.gather(*(client.generate(p, params) for p in batch))
        elapsed = time.perf_counter() - start
        assert all(len(o.output_ids) == new_tokens for o in outs)
        return len(batch) * new_tokens / elapsed

    def close() -> None:
        loop.run_until_complete(client.close())
        loop.close()

    return (lambda: loop.run_until_complete(one_run())), close


def compare(
    path: Path, batch: list[list[int]], new_tokens: int, runs: int, threads: int
) -> tuple[float, float]:
    """Median tokens/s of HF and of the engine, runs interleaved so load from other processes hits both alike."""
    engine = launch_engine(
        EngineSpec(
            model_path=str(path),
            kind="cpu",
            engine_args={"num_threads": threads, "max_running_requests": len(batch)},
        )
    )
    try:
        hf_run = hf_generate(path, batch, new_tokens)
        engine_run, close = engine_generate(engine.url, batch, new_tokens)
        try:
            hf_run(), engine_run()  # warm-up
            hf, eng = [], []
            for _ in range(runs):
                hf.append(hf_run())
                eng.append(engine_run())
        finally:
            close()
        return hf, eng
    finally:
        engine.stop()


def measure(
    models: str = "tiny,small",
    model_path: str | None = None,
    batch_size: int = 16,
    prompt_len: int = 32,
    new_tokens: int = 64,
    runs: int = 3,
    threads: int | None = None,
) -> list[tuple[str, list[float], list[float]]]:
    """[(model name, HF tokens/s per run, engine tokens/s per run)] for each model."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if model_path:
            targets = [(Path(model_path).name, Path(model_path))]
        else:
            targets = [
                (name, build_tiny_checkpoint(Path(tmp) / name, MODELS[name])) for name in models.split(",")
            ]
        for name, path in targets:
            from transformers import AutoConfig

            vocab = AutoConfig.from_pretrained(path).vocab_size
            batch = prompts(vocab, batch_size, prompt_len)
            hf, eng = compare(path, batch, new_tokens, runs, threads)
            rows.append((name, hf, eng))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,small", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--model-path", default=None, help="benchmark this HF checkpoint instead")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    rows = measure(
        args.models, args.model_path, args.batch, args.prompt_len, args.new_tokens, args.runs, args.threads
    )

    print(
        f"\nbatch {args.batch} x {args.new_tokens} new tokens, prompt {args.prompt_len}, "
        f"{args.threads} threads, median of {args.runs} runs"
    )
    print("(best = fastest run: on a shared machine the least disturbed one)")
    head = f"{'model':<8} {'HF tok/s median':>16} {'engine tok/s median':>20} {'ratio':>6}"
    print(f"{head} {'HF best':>9} {'engine best':>12} {'ratio':>6}")
    for name, hf, eng in rows:
        hm, em, hb, eb = statistics.median(hf), statistics.median(eng), max(hf), max(eng)
        print(f"{name:<8} {hm:>16.1f} {em:>20.1f} {em / hm:>6.2f} {hb:>9.1f} {eb:>12.1f} {eb / hb:>6.2f}")


if __name__ == "__main__":
    main()
