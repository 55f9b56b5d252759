"""Shared pieces of the benchmarks: the workload, timing statistics, memory, the machine, and
the BENCHMARKS.md writer. No engine code here, so every engine's worker process imports it
cheaply."""

from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

# Varied natural text (narrative, instructions, dialogue, science, history, business, a letter,
# technical prose) so that prompts look like real requests rather than token noise.
CORPUS: tuple[str, ...] = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He counted the "
    "steps out of habit, one hundred and twelve, though he had known the number for thirty "
    "years. At the top he wiped the salt from the great lens, trimmed the wick, and watched "
    "the first beam sweep across the water. Somewhere out there a fishing boat was turning "
    "for home, and he liked to think that its captain looked up and felt a little less alone.",
    "To make a simple loaf of bread, dissolve a teaspoon of yeast in warm water with a pinch "
    "of sugar and wait until it foams. Add flour and salt, then knead the dough for ten "
    "minutes until it is smooth and springs back when pressed. Cover it and let it rise in a "
    "warm place for about an hour. Shape the loaf, let it rise again, and bake it in a hot "
    "oven until the crust is golden and the bottom sounds hollow when tapped.",
    '"Are you sure this is the right road?" Maya asked, squinting at the map. "Absolutely," '
    'said her brother, who was never absolutely sure of anything. "The sign said the village '
    'was twelve kilometres away." "That sign was pointing the other way." He slowed the car, '
    'looked in the mirror, and sighed. "Fine. We will turn around at the next farm."',
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts of plant "
    "cells, chlorophyll absorbs light, mostly in the blue and red parts of the spectrum. "
    "That energy splits water molecules, releasing oxygen as a by-product, and drives the "
    "synthesis of ATP and NADPH. The Calvin cycle then uses these carriers to fix carbon "
    "dioxide from the air into sugars that the plant uses for growth and storage.",
    "In the spring of 1858 the river Thames smelled so strongly that Parliament considered "
    "moving its sittings out of London. The Great Stink, as the newspapers called it, pushed "
    "the government to fund a new system of sewers designed by the engineer Joseph "
    "Bazalgette. His intercepting sewers carried waste far downstream, and the embankments "
    "built over them still line the river today.",
    "Our quarterly results show revenue growth of eight percent, driven mainly by the new "
    "subscription plans. Costs rose faster than expected because of higher shipping prices "
    "and two delayed product launches. For the next quarter the team will focus on reducing "
    "customer churn, simplifying the onboarding process, and renegotiating contracts with "
    "our largest suppliers. We expect margins to recover by the end of the year.",
    "Dear Aunt Helen, thank you so much for the birthday parcel. The scarf is beautiful and "
    "arrived just in time for the first cold week of autumn. School has been busy; we are "
    "reading a long novel about a whaling ship, and I am not sure I like the captain very "
    "much. Mum says you might visit at Christmas. I hope you do, because the garden looks "
    "lovely under frost and I want to show you the tree we planted.",
    "A hash table stores key and value pairs in an array of buckets. A hash function maps "
    "each key to a bucket index, so lookups take constant time on average. When two keys "
    "land in the same bucket, the table resolves the collision, either by chaining entries "
    "in a list or by probing for the next free slot. As the table fills, it is resized and "
    "every entry is rehashed, which keeps the load factor low and operations fast.",
    "The mountain trail begins behind the old stone chapel and climbs steadily through pine "
    "forest. After about an hour the trees thin out and the path crosses a meadow full of "
    "wild flowers in early summer. Hikers should carry plenty of water, because the spring "
    "marked on older maps has been dry for several years. From the summit, on a clear day, "
    "you can see three lakes and the distant line of the coast.",
    "Economists disagree about how much a rise in the minimum wage affects employment. Some "
    "studies find that modest increases raise the incomes of low-paid workers without "
    "noticeable job losses, while others report fewer hours or slower hiring in small "
    "businesses. Much depends on local conditions, the size of the increase, and how "
    "quickly employers can adjust prices or invest in machines that replace routine work.",
    "The orchestra tuned while the hall slowly filled. A child in the front row asked why the "
    "oboe always played first, and her grandfather explained that its pitch is steady and "
    "easy to hear. When the conductor finally raised his baton, the room fell silent. The "
    "first notes of the symphony were so quiet that people leaned forward in their seats, "
    "afraid to miss anything.",
    "Regular exercise improves the health of the heart and lungs, helps control weight, and "
    "lowers the risk of several chronic diseases. Adults are usually advised to aim for at "
    "least one hundred and fifty minutes of moderate activity each week, such as brisk "
    "walking or cycling, along with exercises that strengthen the major muscle groups. Even "
    "short periods of movement during a long working day bring measurable benefits.",
    "When the volcano erupted, ash fell on the town for three days. The schools closed, the "
    "airport stopped all flights, and volunteers handed out masks at every street corner. "
    "Farmers worried about their animals and their crops, while scientists at the "
    "observatory measured the gases rising from the crater. By the end of the week the "
    "wind had changed direction and the sky was blue again.",
    "To reset the router, unplug it from the wall and wait for thirty seconds. Plug it back "
    "in and wait until the power light stops blinking. If the wireless network still does "
    "not appear, press and hold the small reset button on the back for ten seconds. This "
    "restores the factory settings, so you will need to enter the network name and password "
    "printed on the label underneath the device.",
    "Octopuses are among the most intelligent invertebrates. They can open jars, escape from "
    "tanks, and recognise individual people. Each of their eight arms contains a large "
    "share of their neurons, so an arm can explore and react to its surroundings with some "
    "independence. Many species change the colour and texture of their skin in a fraction "
    "of a second, to hide from predators or to signal to other octopuses.",
    "The committee met on Tuesday to review the proposal for the new library. Several members "
    "praised the design, especially the large reading room with windows facing the park. "
    "Others raised concerns about the cost of heating such a tall building and the lack of "
    "parking nearby. After a long discussion the committee agreed to ask the architects for "
    "a revised plan and to hold a public meeting next month.",
)

SENTENCE_END = re.compile(r"(?<=[.!?\"])\s+")


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(slots=True)
class Workload:
    """The same requests for every engine: prompt token ids and each request's max_tokens."""

    prompts: list[list[int]]
    max_tokens: list[int]
    seed: int

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def build_workload(
    encoder: Encoder,
    num_prompts: int,
    seed: int = 0,
    prompt_len: tuple[int, int] = (20, 600),
    max_tokens: tuple[int, int] = (16, 256),
) -> Workload:
    """Deterministic prompts: each starts at a random sentence of a random passage and reads on
    through passages in a shuffled order, cut to a length drawn uniformly (in llmos tokens)."""
    rng = random.Random(seed)
    passages = [SENTENCE_END.split(p) for p in CORPUS]
    prompts: list[list[int]] = []
    outs: list[int] = []
    for _ in range(num_prompts):
        target = rng.randint(*prompt_len)
        order = rng.sample(range(len(passages)), len(passages))
        first = passages[order[0]]
        parts = [" ".join(first[rng.randrange(len(first)) :])]
        parts += [" ".join(passages[i]) for i in order[1:]]
        ids: list[int] = []
        for k in range(1, len(parts) + 1):  # the whole corpus is far longer than 600 tokens
            ids = encoder.encode("\n\n".join(parts[:k]))
            if len(ids) >= target:
                break
        prompts.append(ids[:target])
        outs.append(rng.randint(*max_tokens))
    return Workload(prompts, outs, seed)


# -- statistics ------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ttft_summary(ttfts: Sequence[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(ttfts),
        "p50": percentile(ttfts, 50),
        "p90": percentile(ttfts, 90),
    }


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- process and machine ---------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def loadavg() -> float:
    return os.getloadavg()[0]


def cpu_stall_us() -> int | None:
    """Linux PSI: total µs in which some runnable task waited for a CPU (None if unavailable).
    Its growth over a phase, divided by the phase's wall time, says how contended the cores
    were: near 0 when the benchmark had them to itself."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(line.rsplit("total=", 1)[1])


def stall_share(start_us: int | None, wall: float) -> float | None:
    """The share of the last `wall` seconds in which some task waited for a CPU."""
    now = cpu_stall_us()
    if start_us is None or now is None or wall <= 0:
        return None
    return (now - start_us) / (wall * 1e6)


def wait_quiet(max_wait: float, stall: float = 0.1, window: float = 5.0) -> float:
    """Wait (at most `max_wait` s) until CPU stall over a `window` falls below `stall`.
    Returns the stall fraction last seen."""
    deadline = time.monotonic() + max_wait
    while True:
        before = cpu_stall_us()
        if before is None:
            return float("nan")
        time.sleep(window)
        frac = (cpu_stall_us() or before) - before
        frac = frac / (window * 1e6)
        if frac < stall or time.monotonic() > deadline:
            return frac


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


# -- worker processes ------------------------------------------------------------------------
class WorkerError(RuntimeError):
    """A benchmark worker process failed; the message carries the end of its stderr."""


def run_worker(
    args: Sequence[str],
    on_line: Callable[[str], None] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 1800.0,
) -> dict[str, Any]:
    """Run `python <args>` in a fresh process that writes one JSON line prefixed `result `.

    Other stdout lines go to `on_line` (progress). Returns the result with `spawn_to_exit` (s).
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    result: dict[str, Any] | None = None
    assert proc.stdout is not None and proc.stderr is not None
    err_lines: list[str] = []
    drain = threading.Thread(target=lambda: err_lines.extend(proc.stderr), daemon=True)
    drain.start()  # so a chatty stderr can never fill its pipe and stall the worker
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("result "):
                result = json.loads(line[len("result ") :])
            elif on_line is not None:
                on_line(line)
        code = proc.wait()
        drain.join(timeout=5)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
    err = "".join(err_lines)
    if code != 0 or result is None:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise WorkerError(f"worker {' '.join(args[1:3])} exited {code}:\n{tail}")
    result["spawn_to_exit"] = time.monotonic() - t0
    return result


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def emit(kind: str, payload: Any = "") -> None:
    """Worker → parent: one line on stdout."""
    text = json.dumps(payload) if kind == "result" else str(payload)
    print(f"{kind} {text}".rstrip(), flush=True)


# -- BENCHMARKS.md ---------------------------------------------------------------------------
def replace_section(path: Path, heading: str, body: str, title: str = "# Benchmarks") -> None:
    """Put `heading` + `body` into a markdown file, replacing only that `## ` section."""
    text = path.read_text() if path.exists() else f"{title}\n"
    section = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if ln.rstrip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    path.write_text(new)


def wait_until_serving(
    probe_url: str, proc: subprocess.Popen, timeout: float, exit_detail: Callable[[], str]
) -> None:
    """Poll `probe_url` until it answers 200; fail early if the server process exits."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {exit_detail()}")
        try:
            if httpx.get(probe_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"server at {probe_url} did not start in {timeout:.0f} s")
        time.sleep(0.5)
