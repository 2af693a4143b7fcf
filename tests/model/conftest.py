import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from model_helpers import SMOLLM_DIR, make_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory):
    """hidden 64, 4 heads / 2 kv heads (GQA 2), untied."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny_gqa"), seed=1)


@pytest.fixture(scope="session")
def tiny_gqa3_dir(tmp_path_factory):
    """GQA ratio 3 like SmolLM2 (6 heads / 2 kv heads, head_dim 16), tied embeddings."""
    return make_tiny_llama(
        tmp_path_factory.mktemp("tiny_gqa3"),
        seed=2,
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=160,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def smollm_dir():
    if not (SMOLLM_DIR / "config.json").is_file():
        pytest.skip("SmolLM2 not converted (.cache/models/SmolLM2-135M-Instruct); run `make`")
    return SMOLLM_DIR


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    from slora_backend.model import load_model

    return load_model(smollm_dir, torch.float32, "cpu")


@pytest.fixture(scope="session")
def smollm_hf(smollm_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    """Small ops + a shared 2-core machine: OpenMP spinning across busy cores makes tiny kernels
    take milliseconds. These tests are about exactness, so run them single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
