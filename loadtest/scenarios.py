"""Declarative workloads and the open-loop request generator.

A scenario is a TOML file in `loadtest/scenarios/` (or any .toml/.json path) whose top-level
keys are the fields of `Scenario`; an optional `[paper]` table holds the values of the S-LoRA
paper (Sheng et al., 2023), applied with `profile="paper"` (`--profile paper`), so one file
documents both the CPU-sized run and the original setting.

The workload follows S-LoRA's synthetic trace (benchmarks/trace.py of the paper's code):
  - arrivals: Gamma inter-arrival times with mean 1/rate and coefficient of variation cv
    (shape 1/cv^2, scale cv^2/rate; cv = 1 is a Poisson process);
  - adapter popularity: `popularity = "power"` is the paper's sampler, index = floor(n * X) with
    X ~ Power(alpha) (density alpha*x^(alpha-1) on [0, 1]): alpha = 1 is uniform, smaller alpha
    concentrates requests on the first adapters. `"zipf"` is p_i ~ (i+1)^-alpha (alpha = 1 is
    skewed), `"uniform"` ignores alpha;
  - input and output lengths uniform in [lo, hi] (inclusive), prompts synthesized from words
    that are one token each in the SmolLM2/Llama tokenizers, so the prompt length is close to
    the target;
  - `ignore_eos = true` makes every request generate exactly `max_tokens` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (e.g. an NGC container): the tomli backport
    import tomli as tomllib

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

PROTOCOLS = ("grpc", "http", "both", "openai")
POPULARITIES = ("power", "zipf", "uniform")
PROFILES = ("cpu", "paper")

# Common English words, each exactly one token (with its leading space) in the SmolLM2
# tokenizer (checked), and one token in most Llama-family BPE vocabularies.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can has been if more when will "
    "would who so no time about people year way day man thing woman life child world school "
    "state family student group country problem hand part place case week company system "
    "program question work government number night point home water room mother area money "
    "story fact month lot right study book eye job word business issue side kind head house "
    "service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door "
    "health person art war history party result change morning reason research girl guy moment "
    "air teacher force education"
).split()


class ScenarioError(ValueError):
    """A scenario file or override that cannot be used (the message says which key and why)."""


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str = ""
    protocol: str = "grpc"  # grpc | http | both (half the users each) | openai
    model: str = "slora"
    num_adapters: int = 3  # n: distinct adapters the requests are spread over (0 = base only)
    alpha: float = 1.0  # popularity exponent (meaning depends on `popularity`)
    popularity: str = "power"  # power (S-LoRA's sampler) | zipf | uniform
    base_fraction: float = 0.0  # share of requests sent to the base model (adapter_id "")
    rate: float = 1.0  # R: mean arrival rate, requests/s (all users together)
    cv: float = 1.0  # coefficient of variation of the Gamma inter-arrival times
    input_len: tuple[int, int] = (8, 64)  # prompt tokens, uniform in [lo, hi]
    output_len: tuple[int, int] = (8, 64)  # max_tokens, uniform in [lo, hi]
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    slo_ttft: float = 6.0  # SLO: first token within this many seconds of the arrival
    adapters: tuple[str, ...] = ()  # explicit adapter ids (folder names), or ...
    adapter_dir: str = ""  # ... a directory to scan (relative paths: against the repo root)
    adapter_ranks: tuple[int, ...] = ()  # when scanning: keep these ranks, interleaved in order
    paper: Mapping[str, Any] = field(default_factory=dict)  # the paper's values (profile "paper")

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ScenarioError:
            return ScenarioError(f"scenario {self.name!r}: {key} {why}")

        if self.protocol not in PROTOCOLS:
            raise bad("protocol", f"must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.popularity not in POPULARITIES:
            raise bad("popularity", f"must be one of {POPULARITIES}, got {self.popularity!r}")
        if not (isinstance(self.num_adapters, int) and self.num_adapters >= 0):
            raise bad("num_adapters", f"must be an integer >= 0, got {self.num_adapters!r}")
        for key in ("alpha", "rate", "cv", "slo_ttft"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise bad(key, f"must be a number > 0, got {value!r}")
        if not (0.0 <= self.base_fraction <= 1.0):
            raise bad("base_fraction", f"must be in [0, 1], got {self.base_fraction!r}")
        if self.num_adapters == 0 and self.base_fraction < 1.0:
            object.__setattr__(self, "base_fraction", 1.0)  # no adapters: everything to base
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise bad("temperature", f"must be >= 0, got {self.temperature!r}")
        for key in ("input_len", "output_len"):
            lo_hi = tuple(getattr(self, key))
            if (len(lo_hi) != 2 or not all(isinstance(v, int) for v in lo_hi)
                    or not 1 <= lo_hi[0] <= lo_hi[1]):
                raise bad(key, f"must be [lo, hi] integers with 1 <= lo <= hi, got {lo_hi!r}")
            object.__setattr__(self, key, lo_hi)
        object.__setattr__(self, "adapters", tuple(self.adapters))
        object.__setattr__(self, "adapter_ranks", tuple(self.adapter_ranks))
        if self.adapters and self.adapter_dir:
            raise bad("adapters", "and adapter_dir are exclusive: give a list or a directory")
        if self.num_adapters > 0 and not (self.adapters or self.adapter_dir):
            raise bad("num_adapters", "> 0 needs `adapters` (ids) or `adapter_dir`")
        if self.adapters and self.num_adapters > len(self.adapters):
            raise bad("num_adapters", f"= {self.num_adapters} but only {len(self.adapters)} "
                                      "adapters are listed")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paper"] = dict(self.paper)
        return d


FIELDS = {f.name: f for f in dataclasses.fields(Scenario)}


def available_scenarios() -> list[str]:
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.toml"))


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    return tomllib.loads(text)


def _coerce(name: str, key: str, value: Any) -> Any:
    """Check a raw value against the field's type; lists become tuples."""
    if key not in FIELDS or key in ("name", "paper"):
        raise ScenarioError(f"scenario {name!r}: unknown key {key!r} "
                            f"(known: {', '.join(sorted(set(FIELDS) - {'name', 'paper'}))})")
    default = FIELDS[key].default
    if isinstance(value, list):
        value = tuple(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ScenarioError(f"scenario {name!r}: {key} must be true or false, got {value!r}")
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif isinstance(default, int) and (not isinstance(value, int) or isinstance(value, bool)):
        raise ScenarioError(f"scenario {name!r}: {key} must be an integer, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ScenarioError(f"scenario {name!r}: {key} must be a string, got {value!r}")
    elif isinstance(default, float) and not isinstance(value, float):
        raise ScenarioError(f"scenario {name!r}: {key} must be a number, got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with a TOML value (`rate=0.5`, `input_len=[8,32]`, `protocol=http`:
    a bare word is taken as a string)."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key:
        raise ScenarioError(f"override {text!r}: expected key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def load_scenario(spec: str | Path, profile: str = "cpu",
                  overrides: Mapping[str, Any] | Iterable[str] = ()) -> Scenario:
    """A scenario by name (a file in loadtest/scenarios/) or path; `profile="paper"` applies
    its [paper] table; `overrides` (a mapping or `key=value` strings) are applied last."""
    if profile not in PROFILES:
        raise ScenarioError(f"profile must be one of {PROFILES}, got {profile!r}")
    path = Path(spec)
    if not path.suffix:
        path = SCENARIO_DIR / f"{spec}.toml"
    if not path.is_file():
        raise ScenarioError(f"no scenario {str(spec)!r} (shipped: "
                            f"{', '.join(available_scenarios())}; or give a .toml/.json path)")
    try:
        raw = _read(path)
    except (ValueError, OSError) as exc:
        raise ScenarioError(f"scenario file {path}: {exc}") from exc
    name = raw.pop("name", path.stem)
    paper = raw.pop("paper", {})
    if not isinstance(paper, dict):
        raise ScenarioError(f"scenario {name!r}: [paper] must be a table")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        values[key] = _coerce(name, key, value)
    if profile == "paper":
        if not paper:
            raise ScenarioError(f"scenario {name!r} has no [paper] table")
        for key, value in paper.items():
            if key != "note":
                values[key] = _coerce(name, key, value)
    if not isinstance(overrides, Mapping):
        overrides = dict(parse_override(o) for o in overrides)
    for key, value in overrides.items():
        values[key] = _coerce(name, key, value)
    return Scenario(name=name, paper=paper, **values)


# --- adapters ---------------------------------------------------------------------------------

def _natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def scan_adapter_dir(directory: str | Path) -> dict[str, int]:
    """{adapter_id: rank} of the PEFT folders (with adapter_config.json) in `directory`."""
    root = Path(directory)
    if not root.is_absolute():
        root = REPO_ROOT / root
    if not root.is_dir():
        raise ScenarioError(f"adapter_dir {str(directory)!r} does not exist ({root})")
    found = {}
    for cfg in root.glob("*/adapter_config.json"):
        try:
            rank = int(json.loads(cfg.read_text()).get("r", 0))
        except (ValueError, OSError):
            continue  # unreadable: the server would refuse it anyway
        found[cfg.parent.name] = rank
    return found


def resolve_adapters(scenario: Scenario) -> list[str]:
    """The `num_adapters` adapter ids the scenario's requests go to, in popularity order
    (index 0 is the most popular under the power/zipf samplers).

    From a directory: adapters of the wanted ranks, interleaved rank by rank in the order of
    `adapter_ranks` (S2 = 64, 32, 16, 8, 64, 32, ... as in S-LoRA), each rank's adapters in
    natural name order."""
    n = scenario.num_adapters
    if n == 0:
        return []
    if scenario.adapters:
        return list(scenario.adapters[:n])
    ranks = scan_adapter_dir(scenario.adapter_dir)
    wanted = scenario.adapter_ranks or tuple(sorted(set(ranks.values())))
    by_rank = {r: sorted((a for a, ar in ranks.items() if ar == r), key=_natural_key)
               for r in wanted}
    picked: list[str] = []
    for i in range(max((len(v) for v in by_rank.values()), default=0)):
        picked += [by_rank[r][i] for r in wanted if i < len(by_rank[r])]
    if len(picked) < n:
        have = {r: len(v) for r, v in by_rank.items()}
        raise ScenarioError(
            f"scenario {scenario.name!r} wants {n} adapters of ranks {list(wanted)} from "
            f"{scenario.adapter_dir!r} but it holds {len(picked)} ({have}); generate them, e.g. "
            f"`.venv/bin/python scripts/gen_synthetic_adapters.py --model "
            f".cache/models/SmolLM2-135M-Instruct --out {scenario.adapter_dir} --count {n} "
            f"--ranks {','.join(map(str, wanted))}`, and serve that directory "
            f"(SLORA_ADAPTER_DIR={scenario.adapter_dir} make serve)")
    return picked[:n]


# --- sampling ---------------------------------------------------------------------------------

def gamma_intervals(rng: np.random.Generator, rate: float, cv: float, size: int) -> np.ndarray:
    """Inter-arrival times with mean 1/rate and coefficient of variation cv."""
    shape = 1.0 / (cv * cv)
    return rng.gamma(shape, cv * cv / rate, size)


def popularity_probs(n: int, alpha: float, popularity: str) -> np.ndarray:
    """Probability of each adapter index 0..n-1 under the sampler (for tests and reports)."""
    i = np.arange(n, dtype=np.float64)
    if popularity == "power":
        return ((i + 1) / n) ** alpha - (i / n) ** alpha
    if popularity == "zipf":
        w = (i + 1) ** -alpha
        return w / w.sum()
    return np.full(n, 1.0 / n)


def sample_adapter_indices(rng: np.random.Generator, n: int, alpha: float, popularity: str,
                           size: int) -> np.ndarray:
    if popularity == "power":
        return np.minimum((rng.power(alpha, size) * n).astype(np.int64), n - 1)
    return rng.choice(n, size=size, p=popularity_probs(n, alpha, popularity))


def synth_prompt(rng: np.random.Generator, num_tokens: int) -> str:
    """About `num_tokens` tokens of text (one-token words; the tokenizer may add a BOS)."""
    words = rng.choice(len(WORDS), size=num_tokens)
    return " ".join(WORDS[w] for w in words)


@dataclass(frozen=True)
class RequestSpec:
    index: int
    t_arrival: float  # seconds after the start of the test
    adapter_id: str  # "" = base model
    input_len: int  # target prompt tokens
    max_tokens: int
    prompt: str
    ignore_eos: bool
    temperature: float
    seed: int

    @property
    def label(self) -> str:
        return self.adapter_id or "base"


class Workload:
    """The infinite, seeded request schedule of a scenario: `next()` gives the requests in
    arrival order. Deterministic for a seed, whatever the timing of the run (open loop: the
    schedule never depends on responses)."""

    BLOCK = 256  # draws per batch (numpy is much faster in blocks)

    def __init__(self, scenario: Scenario, adapter_ids: list[str], seed: int | None = None):
        if len(adapter_ids) != scenario.num_adapters:
            raise ScenarioError(f"scenario {scenario.name!r}: {scenario.num_adapters} adapters "
                                f"expected, got {len(adapter_ids)}")
        self.scenario = scenario
        self.adapter_ids = list(adapter_ids)
        self.seed = scenario.seed if seed is None else seed
        self._rng = np.random.default_rng(self.seed)
        self._index = 0
        self._clock = 0.0
        self._block: list[RequestSpec] = []

    def _refill(self) -> None:
        s, rng, k = self.scenario, self._rng, self.BLOCK
        times = self._clock + np.cumsum(gamma_intervals(rng, s.rate, s.cv, k))
        self._clock = float(times[-1])
        in_lens = rng.integers(s.input_len[0], s.input_len[1] + 1, k)
        out_lens = rng.integers(s.output_len[0], s.output_len[1] + 1, k)
        to_base = rng.random(k) < s.base_fraction
        n = len(self.adapter_ids)
        idx = (sample_adapter_indices(rng, n, s.alpha, s.popularity, k) if n
               else np.zeros(k, dtype=np.int64))
        block = []
        for j in range(k):
            i = self._index + j
            block.append(RequestSpec(
                index=i, t_arrival=float(times[j]),
                adapter_id="" if (to_base[j] or not n) else self.adapter_ids[idx[j]],
                input_len=int(in_lens[j]), max_tokens=int(out_lens[j]),
                prompt=synth_prompt(rng, int(in_lens[j])), ignore_eos=s.ignore_eos,
                temperature=s.temperature, seed=(self.seed * 1_000_003 + i) % 2**63))
        self._index += k
        self._block = block[::-1]

    def next(self) -> RequestSpec:
        if not self._block:
            self._refill()
        return self._block.pop()

    def take(self, count: int) -> list[RequestSpec]:
        return [self.next() for _ in range(count)]
