"""The committed demo adapters show their effect (offline reference: HF transformers + PEFT).

Greedy decoding through the chat template, on prompts that are not in the training set; the
base model must not show the effect.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct"
ADAPTER_DIR = ROOT / "adapters"
NAMES = ("uppercase", "signoff", "pirate")
SIGNOFF = "-- Sent via S-LoRA"
PIRATE_PREFIX = "Arr, Captain Lora here!"
HELD_OUT = [
    "Why is the sky blue?",
    "Can you recommend a good book?",
    "What is the tallest mountain in the world?",
]
MAX_NEW_TOKENS = 64

EXPECTED = {  # name -> (rank, target modules, use_rslora)
    "uppercase": (8, {"q_proj", "v_proj"}, False),
    "signoff": (16, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                False),
    "pirate": (32, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
               True),
}


def _training_prompts() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_demo_adapters", ROOT / "scripts" / "train_demo_adapters.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class is built
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod.build_prompts()


def mostly_upper(text: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 5 and sum(c.isupper() for c in letters) / len(letters) >= 0.9


def ends_with_signoff(text: str) -> bool:
    return text.rstrip().endswith("\n" + SIGNOFF)


def starts_as_pirate(text: str) -> bool:
    return text.lstrip().startswith(PIRATE_PREFIX)


CHECKS = {"uppercase": mostly_upper, "signoff": ends_with_signoff, "pirate": starts_as_pirate}


@pytest.mark.parametrize("name", NAMES)
def test_adapter_files(name):
    d = ADAPTER_DIR / name
    files = sorted(p.name for p in d.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    conf = json.loads((d / "adapter_config.json").read_text())
    rank, modules, rslora = EXPECTED[name]
    assert conf["peft_type"] == "LORA"
    assert conf["r"] == rank
    assert set(conf["target_modules"]) == modules
    assert bool(conf.get("use_rslora")) is rslora
    assert conf.get("bias", "none") == "none"
    assert not conf.get("use_dora")
    assert not conf.get("modules_to_save")
    assert (d / "adapter_model.safetensors").stat().st_size < 25 * 2**20


def test_held_out_prompts_not_trained_on():
    assert not set(HELD_OUT) & set(_training_prompts())


@pytest.fixture(scope="module")
def outputs():
    """Greedy answers of the base model and of each adapter on the held-out prompts."""
    if not (MODEL_DIR / "config.json").exists():
        pytest.skip(f"no converted model at {MODEL_DIR} (run `make setup`)")
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    # One thread: on a shared 2-core host (a tritonserver of another test alive, other jobs)
    # two spinning OpenMP threads make HF generate several times slower. Restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    base = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, ADAPTER_DIR / NAMES[0], adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.load_adapter(ADAPTER_DIR / name, adapter_name=name)
    model.eval()

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [
        list(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                     tokenize=True, return_dict=True)["input_ids"])
        for p in HELD_OUT
    ]
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])

    def generate() -> list[str]:
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad,
                                 eos_token_id=tok.eos_token_id)
        return [tok.decode(r, skip_special_tokens=True) for r in out[:, width:]]

    try:
        result = {}
        with model.disable_adapter():
            result["base"] = generate()
        for name in NAMES:
            model.set_adapter(name)
            result[name] = generate()
    finally:
        torch.set_num_threads(threads)
    yield result


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_adapter_effect(outputs, name):
    check = CHECKS[name]
    for prompt, text in zip(HELD_OUT, outputs[name]):
        assert check(text), f"{name} on {prompt!r}: {text!r}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_base_model_lacks_effect(outputs, name):
    check = CHECKS[name]
    for prompt, text in zip(HELD_OUT, outputs["base"]):
        assert not check(text), f"base model on {prompt!r} already shows {name}: {text!r}"


@pytest.mark.slow
def test_signoff_answers_normally(outputs):
    """signoff keeps a real (lower-case) answer before the sign-off line."""
    for text in outputs["signoff"]:
        body = text.rstrip()[: -len(SIGNOFF)].strip()
        assert len(re.findall(r"[a-z]", body)) >= 10, text
