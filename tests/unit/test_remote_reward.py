"""Remote reward: the shipped reward server as a real process on loopback, the client's retries, backoff,
concurrency limit and refusals, and the recipe's checks of ``rollout.reward_options``.

Servers that misbehave on purpose (503 twice, then an answer; answers that are not numbers) are real HTTP
servers in a thread of the test: the shipped server never answers those, and the client must cope with
third-party servers that do.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from portable_rl.config.reward import RemoteRewardConfig
from portable_rl.data.types import Sample
from portable_rl.distributed import free_port
from portable_rl.rollout.reward_client import (
    ConcurrencyLimit,
    RemoteReward,
    RemoteRewardError,
    shared_remote_reward,
)
from portable_rl.rollout.rewards import call_reward, load_reward_fn

ROOT = Path(__file__).resolve().parents[2]

SLOW_REWARD = """
import time

def slow_length(response, label=None, sample=None, delay_s=0.3):
    time.sleep(delay_s)
    return float(len(response))

def word(response, label=None, sample=None):
    return "high"
"""


class RewardServerProcess:
    """``python -m portable_rl.rollout.reward_server`` on a free loopback port, stopped at exit."""

    def __init__(self, *args: str, pythonpath: Path | None = None):
        import os

        env = dict(os.environ)
        if pythonpath is not None:
            env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
        self.port = free_port("127.0.0.1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "portable_rl.rollout.reward_server", "--port", str(self.port), *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()  # printed once it listens
        assert line.startswith("reward server listening on"), (line, self.proc.stderr.read())
        self.url = f"http://127.0.0.1:{self.port}/score"

    def stats(self) -> dict:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as resp:
            return json.loads(resp.read())

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def server(tmp_path):
    (tmp_path / "user_rewards.py").write_text(SLOW_REWARD, encoding="utf-8")
    started: list[RewardServerProcess] = []

    def start(*args: str) -> RewardServerProcess:
        started.append(RewardServerProcess(*args, pythonpath=tmp_path))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def remote(url: str, **options) -> RemoteReward:
    return RemoteReward(RemoteRewardConfig(url=url, **options))


def score(fn, response: str, label=None, sample=None) -> float:
    return asyncio.run(call_reward(fn, response, label, sample))


def test_server_scores_with_the_builtin_rewards(server):
    math_server = server("--reward", "math")
    fn = remote(math_server.url)
    assert score(fn, "so the answer is \\boxed{4}", "4") == 1.0
    assert score(fn, "so the answer is \\boxed{5}", "4") == 0.0
    tokens = server("--reward", "portable_rl.rollout.rewards:even_token_fraction")
    sample = Sample(prompt_index=0, group_id=0, prompt_tokens=[1, 2], response_tokens=[2, 4, 5, 7])
    assert score(remote(tokens.url), "text", None, sample) == 0.5  # scored on the token ids sent
    assert math_server.stats()["scored"] == 2


def test_recipe_selects_the_remote_reward_and_shares_one_instance(server):
    s = server("--reward", "math", "--reward-options", '{"correct": 2.0}')
    fn = load_reward_fn("remote", url=s.url, retries=0)
    assert isinstance(fn, RemoteReward) and fn is load_reward_fn("remote", url=s.url, retries=0)
    assert score(fn, "\\boxed{7}", "7") == 2.0


def test_overloaded_server_answers_503_and_the_client_retries_until_scored(server):
    s = server(
        "--reward", "user_rewards:slow_length", "--reward-options", '{"delay_s": 0.3}', "--max-in-flight", "1"
    )
    fn = remote(s.url, retries=8, backoff_s=0.05, max_backoff_s=0.4, max_concurrency=3)

    async def three():
        return await asyncio.gather(*(fn(word) for word in ("a", "bb", "ccc")))

    assert asyncio.run(three()) == [1.0, 2.0, 3.0]
    stats = s.stats()
    assert stats["rejected"] >= 1, stats  # the server did shed load: retries were needed
    assert stats["scored"] == 3 and stats["peak_in_flight"] == 1


class _Scripted(ThreadingHTTPServer):
    """A loopback HTTP server answering each POST with the next (status, body) of ``answers``."""

    daemon_threads = True

    def __init__(self, answers: list[tuple[int, str]]):
        self.answers = list(answers)
        self.posts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.posts += 1
                status, body = outer.answers.pop(0) if len(outer.answers) > 1 else outer.answers[0]
                data = body.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/score"
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture
def scripted():
    made: list[_Scripted] = []

    def make(*answers: tuple[int, str]) -> _Scripted:
        made.append(_Scripted(list(answers)))
        return made[-1]

    yield make
    for s in made:
        s.shutdown()
        s.server_close()


def test_transient_503s_are_retried_with_backoff_then_succeed(scripted):
    s = scripted((503, "busy"), (503, "busy"), (200, '{"reward": 0.75}'))
    t0 = time.perf_counter()
    assert score(remote(s.url, retries=2, backoff_s=0.1), "x") == 0.75
    assert s.posts == 3
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # backoff 0.1 s, then doubled


def test_retries_used_up_on_503_name_the_url_and_the_last_answer(scripted):
    s = scripted((503, "still busy"))
    with pytest.raises(RemoteRewardError) as err:
        score(remote(s.url, retries=1, backoff_s=0.01), "x")
    assert s.posts == 2
    assert s.url in str(err.value) and "2 attempt(s)" in str(err.value) and "HTTP 503" in str(err.value)


def test_a_server_that_is_down_fails_after_the_retries_naming_the_url():
    url = f"http://127.0.0.1:{free_port('127.0.0.1')}/score"  # nothing listens there
    t0 = time.perf_counter()
    with pytest.raises(RemoteRewardError) as err:
        score(remote(url, retries=2, backoff_s=0.05, timeout_s=2), "x")
    message = str(err.value)
    assert url in message and "3 attempt(s)" in message and "\n" not in message
    assert time.perf_counter() - t0 >= 0.05 + 0.1


@pytest.mark.parametrize(
    ("body", "shown"),
    [
        ('{"reward": "high"}', "'high'"),
        ('{"reward": NaN}', "nan"),
        ('{"reward": Infinity}', "inf"),
        ('{"reward": true}', "True"),
        ('{"score": 1.0}', "no 'reward' key"),
        ("<html>oops</html>", "not JSON"),
    ],
)
def test_an_answer_that_is_not_a_finite_number_is_refused(scripted, body, shown):
    s = scripted((200, body))
    with pytest.raises(RemoteRewardError) as err:
        score(remote(s.url, retries=3, backoff_s=0.01), "x")
    assert s.url in str(err.value) and shown in str(err.value)
    assert s.posts == 1  # a wrong answer is not retried


def test_a_reward_function_failing_in_the_server_is_not_retried(server):
    s = server("--reward", "user_rewards:word")  # returns "high"
    with pytest.raises(RemoteRewardError) as err:
        score(remote(s.url, retries=3, backoff_s=0.01), "x")
    assert "HTTP 422" in str(err.value) and s.url in str(err.value)
    assert s.stats()["requests"] == 1


def test_concurrency_limit_holds_across_threads_and_event_loops(server):
    s = server("--reward", "user_rewards:slow_length", "--reward-options", '{"delay_s": 0.2}')
    options = {"url": s.url, "max_concurrency": 2}
    fn = shared_remote_reward(options)

    def one_rollout(words):  # each rollout round runs its own event loop, async rollouts in another thread
        async def run():
            return await asyncio.gather(*(fn(w) for w in words))

        return asyncio.run(run())

    results: list[list[float]] = []
    threads = [threading.Thread(target=lambda: results.append(one_rollout(["ab"] * 4))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [[2.0] * 4, [2.0] * 4]
    stats = s.stats()
    assert stats["peak_in_flight"] == 2, stats  # never more than the limit, and the limit was reached
    assert fn.limit.peak == 2 and fn.limit.held == 0


def test_concurrency_limit_passes_a_cancelled_waiters_slot_on():
    limit = ConcurrencyLimit(1)

    async def main():
        async with limit:
            waiter = asyncio.create_task(limit.__aenter__())
            await asyncio.sleep(0.01)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
        async with limit:  # the slot is free again, not lost to the cancelled waiter
            assert limit.held == 1

    asyncio.run(asyncio.wait_for(main(), 5))
    assert limit.held == 0


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"url": "ftp://127.0.0.1/score"}, "rollout.reward_options.url='ftp://127.0.0.1/score'"),
        ({"url": "127.0.0.1:8000"}, "http:// or https://"),
        ({"url": "http://h/score", "timeout_s": 0}, "timeout_s=0 must be > 0"),
        ({"url": "http://h/score", "timeout_s": math.nan}, "timeout_s=nan"),
        ({"url": "http://h/score", "retries": -1}, "retries=-1 must be an integer >= 0"),
        ({"url": "http://h/score", "max_concurrency": 0}, "max_concurrency=0 must be an integer >= 1"),
        ({"url": "http://h/score", "retry": 2}, "rollout.reward_options.retry is not an option"),
        ({}, "needs rollout.reward_options.url"),
    ],
)
def test_remote_reward_options_are_checked_when_the_recipe_is_built(options, needle):
    from portable_rl.config.rollout import RolloutConfig

    with pytest.raises(ValueError) as err:
        RolloutConfig(reward="remote", reward_options=options)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_cli_refuses_a_bad_reward_url_in_one_line_before_the_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "portable_rl",
            "train",
            str(ROOT / "examples" / "tiny_cpu.yaml"),
            "rollout.reward=remote",
            "rollout.reward_options.url=ftp://127.0.0.1:1/score",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "rollout.reward_options.url" in proc.stderr
    assert not out.exists()


def test_reward_server_help_and_bad_arguments():
    help_ = subprocess.run(
        [sys.executable, "-m", "portable_rl.rollout.reward_server", "--help"], capture_output=True, text=True
    )
    assert help_.returncode == 0 and "--max-in-flight" in help_.stdout
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "portable_rl.rollout.reward_server",
            "--reward",
            "no_such_mod:fn",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "no_such_mod" in bad.stderr


def test_example_judge_recipe_loads():
    from portable_rl.recipe import load_recipe

    for path in sorted((ROOT / "examples").glob("*judge*.yaml")):
        recipe = load_recipe(path)
        assert recipe.rollout.reward == "remote"
    assert sorted((ROOT / "examples").glob("*judge*.yaml")), "the generative-RM recipe is missing"


@pytest.mark.parametrize(
    ("text", "want"),
    [("8", 0.8), ("Grade: 10/10", 0.1), ("I'd say 7.", 0.7), ("15", 1.0), ("-3", 0.0), ("no idea", 0.0)],
)
def test_judge_grade_is_the_last_number_over_max_score(text, want):
    from portable_rl.rollout.judge import grade

    assert grade(text, 10.0, 0.0) == pytest.approx(want)


def test_judge_prompt_uses_the_judge_chat_template(tiny_llama):
    from portable_rl.rollout.judge import DEFAULT_TEMPLATE, judge_request

    prompt = DEFAULT_TEMPLATE.format(response="\\boxed{4}", label="4")
    raw = judge_request(prompt, None, 8)
    assert raw["text"] == prompt and raw["sampling_params"] == {"temperature": 0.0, "max_new_tokens": 8}
    templated = judge_request(prompt, str(tiny_llama), 8)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = tok.decode(templated["input_ids"])
    assert "Reference answer: 4" in text and text != prompt  # the template wrapped the prompt
