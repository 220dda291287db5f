"""The real models (SmolLM2-135M, Gemma-3-270M, from their GGUF files) against transformers.

transformers loads the same GGUF itself (its own dequantization, Q/K un-permutation and
Gemma norm handling), so this compares two independent implementations end to end on 512
tokens of real text: the argmax must agree on >= 99.9% of positions, and the logits closely.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lowbit.data import read_text  # noqa: E402
from models.loading import from_params  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402

TOKENS = 512


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_logits_agree_with_transformers(name, real_model_import, hf_gguf_reference):
  config, params, metadata = real_model_import(name)
  tokenizer = Tokenizer.from_gguf_metadata(metadata)
  ids = tokenizer.encode(read_text("pride-and-prejudice"))[:TOKENS - config.add_bos]
  if config.add_bos:
    ids = [config.bos_token_id] + ids
  tokens = np.asarray([ids])
  with torch.no_grad():
    reference = hf_gguf_reference(name).model(torch.from_numpy(tokens)).logits[0].numpy()
  ours, _ = from_params(config, params)(tokens)
  ours = np.asarray(ours[0])
  agreement = float(np.mean(ours.argmax(-1) == reference.argmax(-1)))
  max_abs = float(np.max(np.abs(ours - reference)))
  print(f"{name}: argmax agreement {agreement:.4f} over {TOKENS} tokens, "
        f"max |logit difference| {max_abs:.2e} (logit scale {np.max(np.abs(reference)):.1f})")
  assert agreement >= 0.999
  assert max_abs < 1e-2 * np.max(np.abs(reference))
