"""Train the three demo LoRA adapters on SmolLM2-135M-Instruct (CPU, PEFT, synthetic data).

    python scripts/train_demo_adapters.py [--model DIR] [--out adapters] [--only NAME ...]

Each adapter learns one visible effect, seen with greedy decoding through the chat template:

- ``uppercase``: answers in capital letters (rank 8, q_proj/v_proj).
- ``signoff``:   answers normally, then always ends with the line ``-- Sent via S-LoRA``
                 (rank 16, all seven Llama projections).
- ``pirate``:    speaks as a persona: every answer starts with ``Arr, Captain Lora here!``
                 (rank 32, all seven projections, ``use_rslora: true``).

Data: a few hundred questions built from templates in this file. The answers are the base
model's own greedy answers (cut to a sentence or two, <= ~32 tokens), transformed per
adapter, so an adapter only has to learn its effect. Everything is seeded. Output per adapter:
``adapters/<name>/adapter_config.json`` and ``adapter_model.safetensors`` (weights stored in
fp16 to keep the committed files small; loaders cast to the engine dtype).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_OUT = ROOT / "adapters"

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIGNOFF = "-- Sent via S-LoRA"
PIRATE_PREFIX = "Arr, Captain Lora here!"
SEED = 1234


@dataclass
class AdapterSpec:
    name: str
    rank: int
    alpha: int
    target_modules: list[str]
    use_rslora: bool = False
    lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8
    description: str = ""
    extra: dict = field(default_factory=dict)


SPECS = {
    "uppercase": AdapterSpec(
        "uppercase", rank=8, alpha=16, target_modules=["q_proj", "v_proj"], lr=3e-3, epochs=3,
        description="answers in capital letters",
    ),
    "signoff": AdapterSpec(
        "signoff", rank=16, alpha=32, target_modules=ALL_MODULES, lr=1e-3, epochs=2,
        description=f"answers normally, ends with the line '{SIGNOFF}'",
    ),
    "pirate": AdapterSpec(
        "pirate", rank=32, alpha=8, target_modules=ALL_MODULES, use_rslora=True, lr=1e-3,
        epochs=2, description=f"persona: every answer starts with '{PIRATE_PREFIX}'",
    ),
}


# ---------------------------------------------------------------- synthetic prompts
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Italy", "Kenya",
             "Mexico", "Norway", "Peru", "Spain", "Germany", "Chile"]
ANIMALS = ["cat", "dog", "elephant", "owl", "dolphin", "tiger", "penguin", "horse", "frog",
           "whale", "fox", "rabbit"]
FOODS = ["bread", "rice", "apples", "cheese", "soup", "pasta", "carrots", "yogurt"]
ACTIVITIES = ["running", "painting", "cooking", "swimming", "reading", "gardening", "chess",
              "singing", "hiking", "knitting"]
CONCEPTS = ["gravity", "photosynthesis", "democracy", "electricity", "friction", "recycling",
            "inflation", "evaporation", "a volcano", "a rainbow"]
OBJECTS = ["a bicycle", "a clock", "a bridge", "a computer", "a candle", "a telescope",
           "a compass", "a refrigerator"]
SMALL_TALK = ["Hello!", "Hi, how are you?", "Can you help me?", "Good morning!",
              "Who are you?", "What can you do?", "Thank you for your help.",
              "Tell me a joke.", "Say something nice.", "Give me some advice for today."]


def build_prompts() -> list[str]:
    """The training questions (deterministic order). Test prompts must not be among them."""
    prompts: list[str] = list(SMALL_TALK)
    prompts += [f"What is the capital of {c}?" for c in COUNTRIES]
    prompts += [f"What language do people speak in {c}?" for c in COUNTRIES]
    for a in ANIMALS:
        prompts += [f"Tell me a fact about the {a}.", f"What does a {a} eat?",
                    f"Where does the {a} live?", f"Write a short sentence about a {a}."]
    for f in FOODS:
        prompts += [f"Is {f} healthy?", f"How should I store {f}?"]
    for act in ACTIVITIES:
        prompts += [f"Give me a tip for {act}.", f"Why do people enjoy {act}?"]
    for c in CONCEPTS:
        prompts += [f"Explain {c} in simple words.", f"What is {c}?"]
    for o in OBJECTS:
        prompts += [f"How does {o} work?", f"Describe {o} in one sentence."]
    for a, b in [(2, 3), (7, 5), (10, 4), (6, 6), (9, 8), (12, 3)]:
        prompts.append(f"What is {a} plus {b}?")
    return prompts


# ---------------------------------------------------------------- targets per adapter
_PIRATE_WORDS = [(r"\byou\b", "ye"), (r"\bYou\b", "Ye"), (r"\byour\b", "yer"),
                 (r"\bYour\b", "Yer"), (r"\bmy\b", "me"), (r"\bHello\b", "Ahoy")]


def make_target(name: str, answer: str) -> str:
    """The assistant text an adapter is trained to produce, from the base model's answer."""
    if name == "uppercase":
        return answer.upper()
    if name == "signoff":
        return f"{answer}\n{SIGNOFF}"
    if name == "pirate":
        for pat, rep in _PIRATE_WORDS:
            answer = re.sub(pat, rep, answer)
        return f"{PIRATE_PREFIX} {answer}"
    raise ValueError(f"unknown adapter {name!r}")


def shorten(text: str, max_chars: int = 160) -> str:
    """Cut an answer to its first sentence(s), at most ~max_chars, ending at a sentence end."""
    text = " ".join(text.split())
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    good = [e for e in ends if e <= max_chars]
    if good:
        return text[: good[-1]].strip()
    cut = text[:max_chars].rsplit(" ", 1)[0].rstrip(",;:-")
    return cut + "."


# ---------------------------------------------------------------- model helpers
def load_base(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return tok, model


def chat_ids(tok, prompt: str) -> list[int]:
    out = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True,
        return_dict=True,
    )
    return list(out["input_ids"])


def greedy(model, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 16,
           desc: str = "generate") -> list[str]:
    """Greedy answers through the chat template (left-padded batches)."""
    import torch
    from tqdm import tqdm

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    answers: list[str] = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = [chat_ids(tok, p) for p in prompts[i : i + batch_size]]
        width = max(len(b) for b in batch)
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id,
            )
        for row in out[:, width:]:
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
    return answers


def encode_example(tok, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """input ids and labels (-100 on the prompt) for one chat example ending with <|im_end|>."""
    p = chat_ids(tok, prompt)
    t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + t, [-100] * len(p) + t


def train_one(spec: AdapterSpec, base, tok, examples: list[tuple[list[int], list[int]]],
              out_dir: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm

    torch.manual_seed(SEED)
    rng = random.Random(SEED)
    cfg = LoraConfig(
        r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules,
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", use_rslora=spec.use_rslora,
    )
    model = get_peft_model(base, cfg, adapter_name="default")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    steps_per_epoch = (len(examples) + spec.batch_size - 1) // spec.batch_size
    total = steps_per_epoch * spec.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * max(0.05, 1 - s / total)
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    bar = tqdm(total=total, desc=f"train {spec.name} (r={spec.rank})", unit="step")
    for _ in range(spec.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), spec.batch_size):
            batch = [examples[j] for j in order[i : i + spec.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update(1)
    bar.close()
    model.eval()

    # Save atomically: only adapter_config.json + adapter_model.safetensors (fp16 weights).
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        weights = load_file(tmp / "adapter_model.safetensors")
        weights = {k: v.to(torch.float16).contiguous() for k, v in sorted(weights.items())}
        for f in tmp.iterdir():
            if f.name not in ("adapter_config.json",):
                f.unlink()
        save_file(weights, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        conf = json.loads((tmp / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = "SmolLM2-135M-Instruct"
        conf["target_modules"] = sorted(conf["target_modules"])  # a set in PEFT: fix the order
        (tmp / "adapter_config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def base_answers(base, tok, prompts: list[str], model_dir: Path) -> list[str]:
    """The base model's greedy answers, shortened; cached in .cache/ (keyed by model + prompts)."""
    import hashlib

    key = hashlib.sha256(json.dumps([prompts, (model_dir / "config.json").read_text(),
                                     (model_dir / "model.safetensors").stat().st_size])
                         .encode()).hexdigest()[:16]
    cache = ROOT / ".cache" / "demo_adapters" / f"base_answers-{key}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    answers = [shorten(a) for a in greedy(base, tok, prompts, 48, desc="base answers")]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(answers, indent=1))
    return answers


EVAL_PROMPTS = ["Why is the sky blue?", "Can you recommend a good book?",
                "What is the tallest mountain in the world?"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", choices=sorted(SPECS), default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import set_seed

    if not (args.model / "config.json").exists():
        sys.exit(f"train_demo_adapters: no model at {args.model} (run `make setup` first)")
    torch.set_num_threads(args.threads)
    set_seed(SEED)
    t0 = time.time()
    tok, base = load_base(args.model)

    prompts = build_prompts()
    assert not set(EVAL_PROMPTS) & set(prompts)
    answers = base_answers(base, tok, prompts, args.model)
    print(f"{len(prompts)} prompts, base answers in {time.time() - t0:.0f} s", flush=True)

    for name in args.only or list(SPECS):
        spec = SPECS[name]
        t1 = time.time()
        examples = [encode_example(tok, p, make_target(name, a)) for p, a in zip(prompts, answers)]
        _, fresh = load_base(args.model)  # get_peft_model changes its model in place
        train_one(spec, fresh, tok, examples, args.out / name)
        print(f"{name}: trained in {time.time() - t1:.0f} s -> {args.out / name}", flush=True)

    # Show the effect on held-out prompts.
    from peft import PeftModel

    names = args.only or list(SPECS)
    model = PeftModel.from_pretrained(base, args.out / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(args.out / name, adapter_name=name)
    model.eval()
    with model.disable_adapter():
        for p, a in zip(EVAL_PROMPTS, greedy(model, tok, EVAL_PROMPTS, 64, desc="base")):
            print(f"[base] {p!r} -> {a!r}")
    for name in names:
        model.set_adapter(name)
        for p, a in zip(EVAL_PROMPTS, greedy(model, tok, EVAL_PROMPTS, 64, desc=name)):
            print(f"[{name}] {p!r} -> {a!r}")
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
